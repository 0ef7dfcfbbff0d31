"""A real Postfix from Debian on a loopback port, started by the test from its own configuration directory.

It plays the organisation's mail server as it is usually set up for popbridge: popbridge's address is in
`mynetworks` (so Postfix trusts it as a client that may relay), `allow_percent_hack` and `swap_bangpath`
are on (the defaults), and `relayhost` is empty. Nothing may leave the machine: mail for the local domain
is accepted and thrown away by the `discard` transport (logged as delivered), and mail Postfix resolves
to any other domain goes to transports that are deferred (`defer_transports`) and have no entry in
master.cf, so even a queue flush cannot send it. Such mail stays in the deferred queue, where the test
looks for it (`postqueue -j`). Postfix's own log goes to a file (`maillog_file`, Postfix 3.4+).

The instance is separate from any system Postfix: its configuration directory, queue directory and data
directory live in a temporary directory, `master` runs in the foreground as the test's child (started
with `-c`, never through `postfix start` or a service manager), and /etc/postfix is never read for
configuration or written. It needs root (Postfix's master and its setgid queue layout require it) and the
Debian package (`tests/run.sh` installs it unconfigured).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.parts import missing_part

HOST = "127.0.0.1"
LOCAL_DOMAIN = "example.test"
POSTFIX = "/usr/sbin/postfix"
MASTER = "/usr/lib/postfix/sbin/master"
POSTQUEUE = "/usr/sbin/postqueue"
POSTCAT = "/usr/sbin/postcat"
START_TIMEOUT = 20.0
INSTALL_HINT = "bash tests/run.sh installs it (apt-get install postfix, unconfigured)"

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
myhostname = mx.{domain}
mydomain = {domain}
myorigin = {domain}
mydestination = {domain}
inet_interfaces = {host}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mynetworks_style = host
allow_percent_hack = yes
swap_bangpath = yes
resolve_dequoted_address = yes
relayhost =
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_limit = {recipient_limit}
local_recipient_maps =
alias_maps =
alias_database =
local_transport = discard:delivered to the local domain
default_transport = smtp
relay_transport = relay
defer_transports = smtp, relay
smtp_dns_support_level = disabled
biff = no
"""

# No `smtp` or `relay` client entry: mail resolved to another domain can only wait in the queue.
MASTER_CF = """\
{host}:{port} inet n - n - - smtpd
pickup    unix n - n 60 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixError(RuntimeError):
    """Postfix did not start; the message carries the tail of its log."""


@dataclass(frozen=True)
class QueuedRecipient:
    queue: str
    queue_id: str
    address: str
    reason: str


@dataclass
class Postfix:
    """A running instance: where it listens and how to look into its queue and log."""

    root: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    def queued(self) -> list[QueuedRecipient]:
        """Every recipient still in the queue (`postqueue -j`): for this instance, mail for other domains."""
        out = subprocess.run([POSTQUEUE, "-c", str(self.config_dir), "-j"], check=True, capture_output=True,
                             timeout=30).stdout.decode()
        return [
            QueuedRecipient(entry["queue_name"], entry["queue_id"], r["address"], r.get("delay_reason", ""))
            for entry in map(json.loads, out.splitlines())
            for r in entry["recipients"]
        ]

    def envelope_of(self, queue_id: str) -> str:
        """The queue file's envelope records as `postcat -e` prints them."""
        return subprocess.run([POSTCAT, "-c", str(self.config_dir), "-e", "-q", queue_id], check=True,
                              capture_output=True, timeout=30).stdout.decode("utf-8", "replace")

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_log(self, predicate: str, count: int, timeout: float = 30.0) -> str:
        """The log once it holds `count` lines containing `predicate` (Postfix logs each delivery once)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if sum(predicate in line for line in text.splitlines()) >= count:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"Postfix logged fewer than {count} lines with {predicate!r}:\n{text}")
            time.sleep(0.1)  # polling Postfix's own log file: it offers nothing to await


def postfix_missing() -> str | None:
    """Why this machine cannot run the fixture, or None."""
    if not all(os.path.exists(p) for p in (POSTFIX, MASTER, POSTQUEUE, POSTCAT)):
        return f"Postfix is not installed: {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its master process and setgid queue layout)"
    return None


def _write_config(root: Path, port: int, recipient_limit: int) -> Path:
    etc = root / "etc"
    etc.mkdir(parents=True)
    values = {"root": root, "domain": LOCAL_DOMAIN, "host": HOST, "port": port,
              "recipient_limit": recipient_limit}
    (etc / "main.cf").write_text(MAIN_CF.format(**values))
    (etc / "master.cf").write_text(MASTER_CF.format(**values))
    (root / "queue").mkdir(mode=0o755)  # root's; `postfix check` creates Postfix's queue layout below it
    (root / "data").mkdir(mode=0o700)
    shutil.chown(root / "data", "postfix", "postfix")
    return etc


def _listening_port(pid: int) -> int | None:
    """The TCP port a process listens on, read from /proc (master binds port 0; the kernel picks one)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            return int(fields[1].rsplit(":", 1)[1], 16)
    return None


def _start_master(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    etc = root / "etc"
    # Creates the queue directories with Postfix's owners and modes, in this instance's queue only.
    checked = subprocess.run([POSTFIX, "-c", str(etc), "check"], check=False, capture_output=True, timeout=60)
    if checked.returncode != 0:  # Postfix writes its reason to stderr only on a terminal
        raise PostfixError(f"`postfix -c {etc} check` failed (run it on a terminal to see why): "
                           f"{checked.stderr.decode(errors='replace')}")
    process = subprocess.Popen([MASTER, "-c", str(etc), "-d"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PostfixError(f"master exited: {process.stderr.read().decode() if process.stderr else ''}")
        port = _listening_port(process.pid)
        if port is not None:
            return process, port
        time.sleep(0.05)  # master's bind is not observable any other way
    _stop(process)
    raise PostfixError(f"master did not listen within {START_TIMEOUT:g} s: {(root / 'maillog').read_text()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """master's process group: master and the daemons it forked."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process.stderr is not None:
        process.stderr.close()


@contextmanager
def running_postfix(*, recipient_limit: int = 100) -> Iterator[Postfix]:
    """A fresh Postfix on 127.0.0.1 (a port the kernel chose), stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="popbridge-postfix-"))
    root.chmod(0o755)  # the postfix user must reach its queue below it
    try:
        _write_config(root, 0, recipient_limit)
        process, port = _start_master(root)
        try:
            _wait_for_greeting(port)
            yield Postfix(root=root, port=port, process=process)
        finally:
            _stop(process)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_greeting(port: int) -> None:
    with socket.create_connection((HOST, port), timeout=START_TIMEOUT) as conn:
        if not conn.recv(512).startswith(b"220"):
            raise PostfixError("Postfix did not greet with 220")
        conn.sendall(b"QUIT\r\n")


@pytest.fixture
def postfix() -> Iterator[Postfix]:
    missing = postfix_missing()
    if missing is not None:
        missing_part(missing)
    with running_postfix() as instance:
        yield instance
