"""A throwaway Dovecot (POP3 only, loopback, no TLS) for `popbridge demo` when Dovecot is installed.

The approach of tests/support/dovecot.py, cut down to one user: a configuration written here (no system
configuration is read), one passwd-file user with a Maildir, everything under one temporary directory
that `stop()` removes after every Dovecot process of its process group is gone.

Who runs what: Dovecot refuses mail access as root. Started as root, mail belongs to `nobody` and login
processes run as `dovenull` (or `nobody`); started as anyone else, everything is that user's.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from string import Template
from types import TracebackType
from typing import Self

HOST = "127.0.0.1"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

_CONFIG = Template("""\
# Written by popbridge demo. No system configuration is read.
base_dir = ${root}/run
state_dir = ${root}/state
log_path = ${root}/dovecot.log
instance_name = popbridge-demo
protocols = pop3
listen = 127.0.0.1
shutdown_clients = yes
default_internal_user = ${internal_user}
default_internal_group = ${internal_group}
default_login_user = ${login_user}
first_valid_uid = ${mail_uid}
last_valid_uid = ${mail_uid}
first_valid_gid = ${mail_gid}
last_valid_gid = ${mail_gid}
mail_uid = ${mail_uid}
mail_gid = ${mail_gid}
mail_location = maildir:~/Maildir
mail_fsync = never
pop3_uidl_format = %08Xu%08Xv
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u ${root}/users
}
userdb {
  driver = passwd-file
  args = username_format=%u ${root}/users
}
service pop3-login {
  ${chroot}
  inet_listener pop3 {
    address = 127.0.0.1
    port = ${port}
  }
}
service anvil {
  ${chroot}
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
${rootless}
""")


def dovecot_binary() -> str | None:
    search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("dovecot", path=search_path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _greets(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            return sock.recv(64).startswith(b"+OK")
    except OSError:
        return False


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


class DovecotError(RuntimeError):
    """Dovecot did not start; the message carries the tail of its log."""


def _reachable_by_all(directory: Path) -> bool:
    return all(os.stat(d).st_mode & 0o001 for d in (directory, *directory.parents))


def _new_directory() -> Path:
    """A new 0755 directory for Dovecot's files. Its Unix sockets need a path under 108 bytes, and started
    as root, the mail user must reach the Maildir: a TMPDIR that is long or closed is passed over for /tmp."""
    default = Path(tempfile.gettempdir())
    suitable = len(str(default)) <= 40 and (os.geteuid() != 0 or _reachable_by_all(default))
    parent = default if suitable or not Path("/tmp").is_dir() else Path("/tmp")  # noqa: S108 -- for mkdtemp
    directory = Path(tempfile.mkdtemp(prefix="popbridge-demo-", dir=parent))
    directory.chmod(0o755)
    return directory


class DemoDovecot:
    """One Dovecot serving one POP3 user; `with` starts it and stops it (removing every file)."""

    def __init__(self, binary: str, login: str, password: str) -> None:
        self._binary = binary
        self._login = login
        self._password = password
        self._root = _new_directory()
        self._as_root = os.geteuid() == 0
        mail = pwd.getpwnam("nobody") if self._as_root else pwd.getpwuid(os.geteuid())
        self._uid, self._gid = (mail.pw_uid, mail.pw_gid) if self._as_root else (os.geteuid(), os.getegid())
        self._process: subprocess.Popen[bytes] | None = None
        self._count = 0
        self.host = HOST
        self.port = 0

    @property
    def maildir(self) -> Path:
        return self._root / "mail" / "Maildir"

    @property
    def remaining(self) -> int:
        return sum(1 for sub in ("new", "cur") for entry in os.scandir(self.maildir / sub) if entry.is_file())

    def __enter__(self) -> Self:
        self.start()
        return self

    def start(self) -> None:
        """Start Dovecot and return once it answers; on failure everything is stopped and removed."""
        try:
            self._prepare()
            self._start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def deliver_many(self, messages: Iterable[bytes]) -> None:
        """Write each message into Maildir/new in order (Dovecot lists them in file name order)."""
        for raw in messages:
            self._count += 1
            name = f"{int(time.time())}.M{self._count:09d}P{os.getpid()}.popbridge-demo"
            temporary = self.maildir / "tmp" / name
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(raw)
            self._own(temporary)
            os.rename(temporary, self.maildir / "new" / name)

    def _prepare(self) -> None:
        home = self._root / "mail"
        for directory in (home, self.maildir, *(self.maildir / s for s in ("new", "cur", "tmp"))):
            directory.mkdir(mode=0o700)
            self._own(directory)
        users = self._root / "users"
        users.write_text(f"{self._login}:{{PLAIN}}{self._password}::::{home}::\n", encoding="utf-8")
        users.chmod(0o600)

    def _own(self, path: Path) -> None:
        if self._as_root:
            os.chown(path, self._uid, self._gid)

    def _config(self, port: int) -> str:
        me = pwd.getpwuid(os.geteuid()).pw_name
        login_user = ("dovenull" if _user_exists("dovenull") else "nobody") if self._as_root else me
        return _CONFIG.substitute(
            root=self._root, port=port, mail_uid=self._uid, mail_gid=self._gid,
            login_user=login_user,
            internal_user="root" if self._as_root else me,
            internal_group="root" if self._as_root else grp.getgrgid(os.getegid()).gr_name,
            chroot="" if self._as_root else "chroot =",
            rootless="" if self._as_root else f"service auth-worker {{\n  user = {me}\n}}",
        )

    def _start(self) -> None:
        for _ in range(3):  # a free port may be taken before Dovecot binds it: try another
            self.port = _free_port()
            config = self._root / "dovecot.conf"
            config.write_text(self._config(self.port), encoding="utf-8")
            with (self._root / "stderr.log").open("ab") as output:
                self._process = subprocess.Popen(  # noqa: S603 -- our own binary path and arguments
                    [self._binary, "-F", "-c", str(config)],
                    stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True,
                )
            if self._wait_until_answering(self._process):
                return
            self._stop_process()
        raise DovecotError(f"Dovecot did not start: {self._log_tail()}")

    def _wait_until_answering(self, process: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if _greets(self.port):
                return True
            time.sleep(0.02)
        return False

    def _log_tail(self) -> str:
        files = (self._root / "stderr.log", self._root / "dovecot.log")
        texts = [p.read_text(errors="replace") for p in files if p.exists()]
        return " | ".join(line for text in texts for line in text.splitlines()[-3:])

    def _stop_process(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # the whole group: login and auth processes too
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        deadline = time.monotonic() + STOP_TIMEOUT
        while group_alive(process.pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop every Dovecot process and remove the directory."""
        try:
            self._stop_process()
        finally:
            shutil.rmtree(self._root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
