"""A real Dovecot (POP3, POP3S, STLS, APOP, LMTP) on loopback ports, as pytest fixtures.

`dovecot_server` starts one Dovecot per test session from a configuration written here (no system
configuration is read); `dovecot` gives each test its own users, so tests never see each other's mail.

Who runs what: Dovecot refuses mail access as root ("Mail access not allowed for root") and login
processes as root. Started as root (our containers), the master, auth and internal processes run as
root, login processes as the package's `dovenull` user (chrooted), and mail is owned by `nobody`:
the fixture writes each message as `nobody` and keeps the tree under a 0755 temporary directory so
that user can reach it. Started as anyone else, every process and every file is that user's.
"""

from __future__ import annotations

import datetime
import grp
import ipaddress
import itertools
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from string import Template
from types import TracebackType
from typing import NoReturn, Self

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.demo.dovecot import dovecot_binary, group_alive

HOST = "127.0.0.1"
TLS_HOSTNAME = "localhost"
INSTALL_HINT = "apt-get install dovecot-pop3d dovecot-lmtpd"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
_LOGIN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class DovecotError(RuntimeError):
    """Dovecot did not start or stop; the message carries the tail of its log."""


# --- TLS: a throwaway CA and a server certificate for localhost / 127.0.0.1 / ::1 -------------------


@dataclass(frozen=True, kw_only=True)
class ServerCertificates:
    """PEM files: the test CA (for clients to trust) and the server's certificate chain and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_server_certificates(directory: Path, hostname: str = TLS_HOSTNAME) -> ServerCertificates:
    """Write a fresh CA and a server certificate for `hostname`, 127.0.0.1 and ::1 into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _ca_certificate(ca_key)
    server = _server_certificate(server_key, ca, ca_key, hostname)
    files = ServerCertificates(
        ca_file=directory / "ca.pem", cert_file=directory / "server.pem", key_file=directory / "server.key"
    )
    files.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(files.key_file, key_pem)
    return files


def _certificate_builder(subject: str, issuer: x509.Name | None = None) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
    )


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    public = key.public_key()
    return (
        _certificate_builder("popbridge test CA")
        .public_key(public)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hostname: str
) -> x509.Certificate:
    names: list[x509.GeneralName] = [
        x509.DNSName(hostname),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    return (
        _certificate_builder(hostname, issuer=ca.subject)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


# --- Who Dovecot's processes run as -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Accounts:
    internal_user: str
    internal_group: str
    login_user: str
    mail_uid: int
    mail_gid: int
    rootless: bool


def _accounts() -> _Accounts:
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
        return _Accounts(
            internal_user=me, internal_group=group, login_user=me,
            mail_uid=os.geteuid(), mail_gid=os.getegid(), rootless=True,
        )  # fmt: skip
    login_user = "dovenull" if _user_exists("dovenull") else "nobody"
    mail = pwd.getpwnam("nobody")
    return _Accounts(
        internal_user="root", internal_group="root", login_user=login_user,
        mail_uid=mail.pw_uid, mail_gid=mail.pw_gid, rootless=False,
    )  # fmt: skip


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


# --- The configuration ----------------------------------------------------------------------------

_CONFIG = Template("""\
# Written by tests/support/dovecot.py for one test session. No system configuration is read.
base_dir = ${root}/run
state_dir = ${root}/state
log_path = ${root}/log/dovecot.log
instance_name = popbridge-test
hostname = localhost
protocols = pop3 lmtp
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
mail_max_userip_connections = 100
pop3_uidl_format = %08Xu%08Xv

ssl = yes
ssl_cert = <${cert_file}
ssl_key = <${key_file}

# APOP needs the plaintext password, hence scheme=PLAIN; plain USER/PASS is allowed without TLS.
disable_plaintext_auth = no
auth_mechanisms = plain login apop
auth_failure_delay = 0
auth_verbose = yes
# One passwd-file per user: Dovecot re-checks a changed passwd-file at most once a second, but opens
# a file it has not seen at the first lookup, so a user added a moment ago can log in at once.
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u ${users}/%u
}
userdb {
  driver = passwd-file
  args = username_format=%u ${users}/%u
}

# LMTP: RCPT TO:<login@any.domain> delivers to `login`.
protocol lmtp {
  auth_username_format = %Ln
}

service pop3-login {
  ${chroot_setting}
  inet_listener pop3 {
    address = 127.0.0.1
    port = ${pop3_port}
  }
  inet_listener pop3s {
    address = 127.0.0.1
    port = ${pop3s_port}
    ssl = yes
  }
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = ${lmtp_port}
  }
}
# No growing delay (2 s, 4 s, ... 15 s) after failed logins from 127.0.0.1: tests fail logins on purpose.
service anvil {
  ${chroot_setting}
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
${rootless_services}
""")

# Without root nothing can chroot or change user (the "Rootless installation" page of the Dovecot wiki).
_ROOTLESS_SERVICES = Template("""\
service auth-worker {
  user = ${internal_user}
}
""")


@dataclass(frozen=True, kw_only=True)
class _Ports:
    pop3: int
    pop3s: int
    lmtp: int


def _free_ports() -> _Ports:
    """Three distinct free loopback ports (held open together so they differ)."""
    with socket.socket() as a, socket.socket() as b, socket.socket() as c:
        for sock in (a, b, c):
            sock.bind((HOST, 0))
        ports = [int(sock.getsockname()[1]) for sock in (a, b, c)]
    return _Ports(pop3=ports[0], pop3s=ports[1], lmtp=ports[2])


def _render_config(root: Path, accounts: _Accounts, tls: ServerCertificates, ports: _Ports) -> str:
    rootless = _ROOTLESS_SERVICES.substitute(internal_user=accounts.internal_user)
    return _CONFIG.substitute(
        root=root, users=root / "users", cert_file=tls.cert_file, key_file=tls.key_file,
        internal_user=accounts.internal_user, internal_group=accounts.internal_group,
        login_user=accounts.login_user, mail_uid=accounts.mail_uid, mail_gid=accounts.mail_gid,
        chroot_setting="chroot =" if accounts.rootless else "",
        rootless_services=rootless if accounts.rootless else "",
        pop3_port=ports.pop3, pop3s_port=ports.pop3s, lmtp_port=ports.lmtp,
    )  # fmt: skip


# --- The server -----------------------------------------------------------------------------------


class DovecotServer:
    """One Dovecot master process whose configuration, sockets, logs and mail all live under `root`.

    Users can be added before or after `start()` and log in at once. Messages are written straight
    into a user's Maildir `new/`, byte for byte, in the order given; POP3 lists them in that order.
    """

    def __init__(self, root: Path, *, binary: str = "dovecot") -> None:
        self._root = root
        self._binary = binary
        self._accounts = _accounts()
        self._tls = make_server_certificates(root / "tls")
        self._ports = _Ports(pop3=0, pop3s=0, lmtp=0)
        self._process: subprocess.Popen[bytes] | None = None
        self._passwords: dict[str, str] = {}
        self._lock = threading.Lock()
        self._sequence = itertools.count()
        self._epoch = int(time.time())
        (root / "mail").mkdir(mode=0o755, parents=True, exist_ok=True)
        (root / "log").mkdir(exist_ok=True)
        (root / "users").mkdir(exist_ok=True)

    # Addresses and files tests need.
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
    def ca_file(self) -> Path:
        """The test CA (PEM) that signed the server certificate for `localhost` and 127.0.0.1."""
        return self._tls.ca_file

    @property
    def log_file(self) -> Path:
        return self._root / "log" / "dovecot.log"

    def client_tls_context(self) -> ssl.SSLContext:
        """A default client context that trusts only the test CA (hostname `localhost`)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    # Lifecycle.
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start Dovecot and return once POP3, POP3S and LMTP answer; retries if a port was taken."""
        if self._process is not None:
            raise DovecotError("Dovecot is already running")
        for _ in range(3):
            self._ports = _free_ports()
            config = self._root / "dovecot.conf"
            config.write_text(_render_config(self._root, self._accounts, self._tls, self._ports))
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
            process = subprocess.Popen(
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
            and _greets(self._ports.lmtp, b"220")
            and _greets(self._ports.pop3s, b"")
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
        return f"{self._epoch}.M{sequence:09d}P{os.getpid()}.popbridge-test"

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
        _write_private(temporary, line.encode())
        os.replace(temporary, self._root / "users" / name)


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
            os.killpg(group, signal.SIGKILL)
            return
        time.sleep(0.02)


# --- Fixtures -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MailUser:
    """A POP3 login on the test Dovecot."""

    login: str
    password: str


class DovecotMailboxes:
    """One test's users on the session's Dovecot: each `new_user()` is a login no other test has."""

    def __init__(self, server: DovecotServer, prefix: str) -> None:
        self.server = server
        self._prefix = prefix
        self._count = itertools.count(1)

    def new_user(self, name: str = "user", password: str | None = None) -> MailUser:
        user = MailUser(
            login=f"{self._prefix}-{name}{next(self._count)}", password=password or secrets.token_urlsafe(12)
        )
        self.server.add_user(user.login, user.password)
        return user

    def deliver(self, user: MailUser, raw: bytes) -> None:
        self.server.deliver(user.login, raw)

    def deliver_many(self, user: MailUser, messages: Iterable[bytes]) -> None:
        self.server.deliver_many(user.login, messages)

    def message_count(self, user: MailUser) -> int:
        return self.server.message_count(user.login)

    def maildir(self, user: MailUser) -> Path:
        return self.server.maildir(user.login)


def _dovecot_binary() -> str:
    found = dovecot_binary()
    if found is None:
        _dovecot_missing()
    return found


def _dovecot_missing() -> NoReturn:
    message = f"the dovecot binary is not installed; run: {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def dovecot_server() -> Iterator[DovecotServer]:
    """One real Dovecot for the whole session, stopped (with all its processes) at the end."""
    binary = _dovecot_binary()
    root = Path(tempfile.mkdtemp(prefix="popbridge-dovecot-"))
    root.chmod(0o755)  # the mail user (not us, when we are root) must reach its Maildir
    try:
        with DovecotServer(root, binary=binary) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


_test_counter = itertools.count(1)


@pytest.fixture
def dovecot(dovecot_server: DovecotServer, request: pytest.FixtureRequest) -> DovecotMailboxes:
    """The session's Dovecot, seen through users that belong to this test only."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:24].strip("-") or "test"
    return DovecotMailboxes(dovecot_server, f"t{next(_test_counter)}-{slug}")
