"""A throwaway Dovecot on loopback, for `popbridge demo` and for the tests: the one Dovecot helper, written
from the one configuration template (dovecot_config.py; no system configuration is read).

`Dovecot` runs one master process whose configuration, sockets, logs and mail all live under one root
directory: POP3 always; POP3S (and STLS) when given a certificate; LMTP when asked. Users can be added
before or after `start()` and log in at once. `DemoDovecot` is the demo's: one user, POP3 only, in a
temporary directory that `stop()` removes. The tests (tests/support/dovecot.py) add a test CA and LMTP.

Who runs what: Dovecot refuses mail access as root ("Mail access not allowed for root") and login
processes as root. Started as root (our containers), the master, auth and internal processes run as root,
login processes as the package's `dovenull` user (chrooted), and mail is owned by `nobody`: mail is written
as `nobody`, under a 0755 root directory that user can reach. Started as anyone else, every process and
every file is that user's.

Ports: Dovecot cannot listen on port 0 and say which port it got, so free ports are picked, and a start
that lost one of them to another process is retried on new ones.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

from services.demo.dovecot_config import (
    HOST,
    Ports,
    Setup,
    TlsFiles,
    accounts,
    free_ports,
    render_config,
)

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
_LOGIN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class DovecotError(RuntimeError):
    """Dovecot did not start or stop; the message carries the tail of its log."""


def dovecot_binary() -> str | None:
    search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("dovecot", path=search_path)


def group_alive(group: int) -> bool:
    """Whether a live (not zombie) process of process group `group` remains, read from /proc."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == group:
                return True
    return False


def new_root(prefix: str) -> Path:
    """A new 0755 directory for Dovecot's files. Its Unix sockets need a path under 108 bytes, and started
    as root, the mail user must reach the Maildir: a TMPDIR that is long or closed is passed over for /tmp."""
    default = Path(tempfile.gettempdir())
    suitable = len(str(default)) <= 40 and (os.geteuid() != 0 or _reachable_by_all(default))
    parent = default if suitable or not Path("/tmp").is_dir() else Path("/tmp")  # noqa: S108 -- for mkdtemp
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    directory.chmod(0o755)
    return directory


def _reachable_by_all(directory: Path) -> bool:
    return all(os.stat(d).st_mode & 0o001 for d in (directory, *directory.parents))


# --- The server -----------------------------------------------------------------------------------


class Dovecot:
    """One Dovecot master process whose configuration, sockets, logs and mail all live under `root`.

    Messages are written straight into a user's Maildir `new/`, byte for byte, in the order given; POP3
    lists them in that order.
    """

    def __init__(self, root: Path, *, binary: str = "dovecot", tls: TlsFiles | None = None,
                 lmtp: bool = False, instance: str = "popbridge") -> None:
        self._root = root
        self._binary = binary
        self._tls = tls
        self._lmtp = lmtp
        self._instance = instance
        self._accounts = accounts()
        self._ports = Ports(pop3=0)
        self._process: subprocess.Popen[bytes] | None = None
        self._passwords: dict[str, str] = {}
        self._lock = threading.Lock()
        self._sequence = itertools.count()
        self._epoch = int(time.time())
        for sub in ("mail", "log", "users"):
            (root / sub).mkdir(mode=0o755, parents=True, exist_ok=True)

    # Addresses and files.
    @property
    def host(self) -> str:
        return HOST

    @property
    def pop3_port(self) -> int:
        return self._ports.pop3

    @property
    def pop3s_port(self) -> int:
        return self._ports.pop3s

    @property
    def lmtp_port(self) -> int:
        return self._ports.lmtp

    @property
    def log_file(self) -> Path:
        return self._root / "log" / "dovecot.log"

    # Lifecycle.
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start Dovecot and return once every listener answers; retries if a port was taken."""
        if self._process is not None:
            raise DovecotError("Dovecot is already running")
        for _ in range(3):
            self._ports = free_ports(tls=self._tls is not None, lmtp=self._lmtp)
            config = self._root / "dovecot.conf"
            config.write_text(render_config(Setup(
                root=self._root, instance=self._instance, accounts=self._accounts, tls=self._tls,
                ports=self._ports,
            )))  # fmt: skip
            if self._launch(config):
                return
            if "Address already in use" not in self.log_tail():
                break
        raise DovecotError(f"Dovecot did not start:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop Dovecot and make sure none of its processes is left."""
        process, self._process = self._process, None
        if process is None:
            return
        # SIGTERM to the whole process group: told alone, the master waits up to 6 s for login
        # processes it spawns while shutting down; every Dovecot process exits on SIGTERM.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _wait_for_group_to_exit(process.pid)

    def kill(self) -> None:
        """SIGKILL every Dovecot process at once, as a crash would; `restart()` brings it back."""
        process, self._process = self._process, None
        if process is None:
            return
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        _wait_for_group_to_exit(process.pid)

    def restart(self) -> None:
        """Start again on the ports of the last start, so clients keep their configuration."""
        if self._process is not None:
            raise DovecotError("Dovecot is already running")
        if not self._launch(self._root / "dovecot.conf"):
            raise DovecotError(f"Dovecot did not restart:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        files = (self._root / "stderr.log", self.log_file)
        texts = [path.read_text(errors="replace") for path in files if path.exists()]
        return "\n".join("\n".join(text.splitlines()[-lines:]) for text in texts)

    def _launch(self, config: Path) -> bool:
        with (self._root / "stderr.log").open("ab") as output:
            process = subprocess.Popen(  # noqa: S603 -- our own binary path and arguments
                [self._binary, "-F", "-c", str(config)],
                stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True,
            )  # fmt: skip
        self._process = process
        if self._wait_until_answering(process):
            return True
        if process.poll() is not None:  # exited, e.g. a port was taken meanwhile
            self._process = None
            return False
        self.stop()
        raise DovecotError(f"Dovecot did not answer within {START_TIMEOUT} s:\n{self.log_tail()}")

    def _wait_until_answering(self, process: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if self._answers():
                return True
            time.sleep(0.02)
        return False

    def _answers(self) -> bool:
        return (
            _greets(self._ports.pop3, b"+OK")
            and (not self._ports.lmtp or _greets(self._ports.lmtp, b"220"))
            and (not self._ports.pop3s or _greets(self._ports.pop3s, b""))
        )

    # Users and mail.
    def add_user(self, name: str, password: str) -> None:
        """Create a POP3/LMTP user with a Maildir; `name` is lowercase, `password` has no ':' or newline."""
        if not _LOGIN.fullmatch(name):
            raise ValueError(f"user name {name!r} must match {_LOGIN.pattern}")
        if not password or any(c in password for c in ":\r\n\0"):
            raise ValueError("password must be non-empty without ':', CR, LF or NUL (passwd-file format)")
        with self._lock:
            known = self._passwords.get(name)
            if known is not None and known != password:
                raise ValueError(f"user {name!r} already exists with another password")
            self._passwords[name] = password
            self._make_maildir(name)
            self._write_passwd_file(name, password)

    def maildir(self, user: str) -> Path:
        if user not in self._passwords:
            raise KeyError(f"no Dovecot user {user!r}; add_user() first")
        return self._home(user) / "Maildir"

    def deliver(self, user: str, raw: bytes) -> None:
        """Put `raw` into the user's Maildir `new/`, byte for byte."""
        self.deliver_many(user, [raw])

    def deliver_many(self, user: str, messages: Iterable[bytes]) -> None:
        """Deliver each message in order (10,000 small ones take about 1.5 s)."""
        maildir = self.maildir(user)
        for raw in messages:
            name = self._next_filename()
            temporary = maildir / "tmp" / name
            self._write_mail_file(temporary, raw)
            os.rename(temporary, maildir / "new" / name)

    def message_count(self, user: str) -> int:
        """Messages in the Maildir (`new/` and `cur/`): what POP3 has not deleted yet."""
        maildir = self.maildir(user)
        return sum(1 for sub in ("new", "cur") for entry in os.scandir(maildir / sub) if entry.is_file())

    def _home(self, user: str) -> Path:
        return self._root / "mail" / user

    def _next_filename(self) -> str:
        # Dovecot gives new mail UIDs in file name order (time, then the M field): a fixed time and
        # a zero-padded sequence keep POP3 order equal to delivery order.
        with self._lock:
            sequence = next(self._sequence)
        return f"{self._epoch}.M{sequence:09d}P{os.getpid()}.{self._instance}"

    def _make_maildir(self, user: str) -> None:
        home = self._home(user)
        for directory in (home, home / "Maildir", *(home / "Maildir" / sub for sub in ("new", "cur", "tmp"))):
            directory.mkdir(mode=0o700, exist_ok=True)
            self._own(directory)

    def _write_mail_file(self, path: Path, data: bytes) -> None:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if not self._accounts.rootless:
                os.fchown(descriptor, self._accounts.mail_uid, self._accounts.mail_gid)
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view) :]
        finally:
            os.close(descriptor)

    def _own(self, path: Path) -> None:
        if not self._accounts.rootless:
            os.chown(path, self._accounts.mail_uid, self._accounts.mail_gid)

    def _write_passwd_file(self, name: str, password: str) -> None:
        # Written whole under another name and renamed, so Dovecot never reads half a file.
        line = f"{name}:{{PLAIN}}{password}::::{self._home(name)}::\n"
        temporary = self._root / "users" / f".{name}.new"
        write_private(temporary, line.encode())
        os.replace(temporary, self._root / "users" / name)


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path`, readable by its owner only (a password, a private key)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _greets(port: int, greeting: bytes) -> bool:
    """Whether `port` accepts a connection and (if `greeting`) sends a line starting with it."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            return not greeting or sock.recv(512).startswith(greeting)
    except OSError:
        return False


def _wait_for_group_to_exit(group: int) -> None:
    deadline = time.monotonic() + STOP_TIMEOUT
    while group_alive(group):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            return
        time.sleep(0.02)


# --- The demo's --------------------------------------------------------------------------------------


class DemoDovecot:
    """One Dovecot serving the demo's one POP3 user; `with` starts it and stops it (removing every file)."""

    def __init__(self, binary: str, login: str, password: str) -> None:
        self._login = login
        self._password = password
        self._root = new_root("popbridge-demo-")
        self._server = Dovecot(self._root, binary=binary, instance="popbridge-demo")
        self.host = HOST

    @property
    def port(self) -> int:
        return self._server.pop3_port

    @property
    def remaining(self) -> int:
        return self._server.message_count(self._login)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start Dovecot and return once it answers; on failure everything is stopped and removed."""
        try:
            self._server.add_user(self._login, self._password)
            self._server.start()
        except BaseException:
            self.stop()
            raise

    def deliver_many(self, messages: Iterable[bytes]) -> None:
        """Write each message into the Maildir, in order."""
        self._server.deliver_many(self._login, messages)

    def stop(self) -> None:
        """Stop every Dovecot process and remove the directory."""
        try:
            self._server.stop()
        finally:
            shutil.rmtree(self._root, ignore_errors=True)
