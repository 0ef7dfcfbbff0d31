"""An SMTP server in its own process that answers by script and journals every step, for the chaos suite.

    python -m tests.support.scripted_smtp --journal FILE --port-file FILE [--port P] [--think S]

It must outlive the harness's own event loop and be killable on its own ("the SMTP server is down for a
while"), so it is a process, not the in-process sink of tests.support.smtp. Behaviour is chosen by the
recipient's local part (the chaos mail names its token in the envelope sender, `bounce-<token>@...`, so
RCPT already knows which message it is):

    defer*   451 at RCPT for the first DEFER_ATTEMPTS attempts of a message, then accepted
    reject*  550 at RCPT, always
    drop*    the first DATA of a message is journaled as received, then the connection is dropped
             without a reply (a server that stored the mail and died before saying so); later accepted
    anything else: accepted

Every step is one JSON line appended to the journal (one `os.write` on an O_APPEND descriptor, so a killed
server leaves whole lines, and a restart reads the attempts it already counted back):

    {"k": "up", "t", "pid", "port"}                      the server listens
    {"k": "session", "s", "t", "client_pid"}             a client connected (its pid read from /proc)
    {"k": "rcpt", "s", "t", "token", "rcpt", "reply"}    one RCPT and its reply
    {"k": "data", "s", "t", "token", "fetch_id", "rcpts", "outcome"}   "accepted" or "dropped"
    {"k": "replied", "s", "t", "token"}                  the 250 for that DATA is being sent
    {"k": "acked", "s", "t", "token"}                    the client spoke again after that reply
    {"k": "end", "s", "t", "quit"}                       the session closed (quit: the client sent QUIT)

"data" is written before the reply, as a real server commits the mail before it answers: a copy whose
session breaks after "data" is in the recipient's mailbox even though the client never heard so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

HOST = "127.0.0.1"
DEFER_ATTEMPTS = 2
DATA_SIZE_LIMIT = 64 * 1024 * 1024
BIND_RETRY_SECONDS = 15.0  # a restart rebinds its old port; TIME_WAIT or a stray bind may hold it briefly
TOKEN = re.compile(rb"ctk-[0-9a-f]+-[0-9]+")
FETCH_ID = re.compile(rb"\bid <([0-9a-f]{32})>")
SENDER_TOKEN = re.compile(r"bounce-(ctk-[0-9a-f]+-[0-9]+)@")


def behaviour(recipient: str) -> str:
    """The scripted behaviour of a recipient: "defer", "reject", "drop" or "accept"."""
    local = recipient.partition("@")[0].lower()
    for name in ("defer", "reject", "drop"):
        if local.startswith(name):
            return name
    return "accept"


class Journal:
    """Append-only JSON lines; survives the server's restarts and tells it what it already counted."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.rcpt_attempts: Counter[tuple[str, str]] = Counter()
        self.dropped: set[tuple[str, str]] = set()
        for entry in read_journal(path):
            self._count(entry)

    def write(self, kind: str, **fields: Any) -> None:
        entry = {"k": kind, "t": time.time(), **fields}
        os.write(self._fd, (json.dumps(entry) + "\n").encode())
        self._count(entry)

    def _count(self, entry: dict[str, Any]) -> None:
        if entry["k"] == "rcpt":
            self.rcpt_attempts[entry["token"], entry["rcpt"]] += 1
        elif entry["k"] == "data" and entry["outcome"] == "dropped":
            self.dropped.update((entry["token"], r) for r in entry["rcpts"])

    def close(self) -> None:
        os.close(self._fd)


def read_journal(path: Path) -> list[dict[str, Any]]:
    """Every whole line of a journal (a torn last line, from a kill mid-write, is skipped)."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


def client_pid(peer_port: int, server_port: int) -> int | None:
    """The pid holding the loopback socket 127.0.0.1:peer_port -> :server_port, read from /proc."""
    inode = _socket_inode(peer_port, server_port)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return int(pid)
    return None


def _socket_inode(peer_port: int, server_port: int) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1].split(":"), fields[2].split(":")
            if int(local[1], 16) == peer_port and int(remote[1], 16) == server_port:
                return fields[9]
    return None


class ScriptedSMTP(SMTP):
    """aiosmtpd's SMTP with a journaled session: who connected, and how the session ended."""

    line_length_limit = DATA_SIZE_LIMIT
    session_ids = itertools.count(1)

    def __init__(self, handler: Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._journal = handler.journal
        self.session_id = f"{os.getpid()}-{next(self.session_ids)}"
        self.quit = False
        self.unacked: str | None = None  # the token whose 250 the client has not answered yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        pid = client_pid(int(peer[1]), int(local[1])) if peer and local else None
        self._journal.write("session", s=self.session_id, client_pid=pid)

    def connection_lost(self, error: Exception | None) -> None:
        self._journal.write("end", s=self.session_id, quit=self.quit)
        super().connection_lost(error)

    def client_spoke(self) -> None:
        if self.unacked is not None:
            self._journal.write("acked", s=self.session_id, token=self.unacked)
            self.unacked = None


class Handler:
    """The script: aiosmtpd's handler hooks."""

    def __init__(self, journal: Journal, think: float) -> None:
        self.journal = journal
        self.think = think

    async def handle_MAIL(
        self, server: ScriptedSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        server.client_spoke()
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RSET(self, server: ScriptedSMTP, session: Session, envelope: Envelope) -> str:
        server.client_spoke()
        return "250 OK"

    async def handle_NOOP(self, server: ScriptedSMTP, session: Session, envelope: Envelope, arg: str) -> str:
        server.client_spoke()
        return "250 OK"

    async def handle_QUIT(self, server: ScriptedSMTP, session: Session, envelope: Envelope) -> str:
        server.client_spoke()
        server.quit = True
        return "221 Bye"

    async def handle_RCPT(
        self, server: ScriptedSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        token = _sender_token(envelope.mail_from or "")
        reply = self._rcpt_reply(token, address.lower())
        self.journal.write("rcpt", s=server.session_id, token=token, rcpt=address.lower(), reply=reply)
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return reply

    def _rcpt_reply(self, token: str, recipient: str) -> str:
        kind = behaviour(recipient)
        if kind == "reject":
            return "550 5.1.1 scripted: no such mailbox"
        if kind == "defer" and self.journal.rcpt_attempts[token, recipient] < DEFER_ATTEMPTS:
            return "451 4.2.0 scripted: try again later"
        return "250 OK"

    async def handle_DATA(self, server: ScriptedSMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        token_match, fetch_match = TOKEN.search(content), FETCH_ID.search(content[:2000])
        token = token_match.group().decode() if token_match else ""
        rcpts = [r.lower() for r in envelope.rcpt_tos]
        drop = any(behaviour(r) == "drop" and (token, r) not in self.journal.dropped for r in rcpts)
        self.journal.write(
            "data", s=server.session_id, token=token, rcpts=rcpts,
            fetch_id=fetch_match.group(1).decode() if fetch_match else "",
            outcome="dropped" if drop else "accepted",
        )  # fmt: skip
        if drop:
            assert isinstance(server.transport, asyncio.Transport)
            server.transport.abort()  # aiosmtpd cancels this handler when it sees the connection lost
            await asyncio.Event().wait()
        await asyncio.sleep(self.think)  # a server that scans the mail before it answers
        self.journal.write("replied", s=server.session_id, token=token)
        server.unacked = token
        return "250 OK"


def _sender_token(mail_from: str) -> str:
    match = SENDER_TOKEN.search(mail_from)
    return match.group(1) if match else ""


async def serve(journal_path: Path, port_file: Path, port: int, think: float) -> None:
    journal = Journal(journal_path)
    handler = Handler(journal, think)
    loop = asyncio.get_running_loop()

    def factory() -> ScriptedSMTP:
        return ScriptedSMTP(
            handler,
            hostname="chaos-smtp.localhost",
            decode_data=False,
            enable_SMTPUTF8=True,
            data_size_limit=DATA_SIZE_LIMIT,
        )

    server = await _bind(loop, factory, port)
    bound = int(server.sockets[0].getsockname()[1])
    journal.write("up", pid=os.getpid(), port=bound)
    temporary = port_file.with_suffix(".tmp")
    temporary.write_text(f"{bound}\n")
    temporary.replace(port_file)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()
    journal.close()


async def _bind(loop: asyncio.AbstractEventLoop, factory: Any, port: int) -> asyncio.Server:
    """Bind `port` (0: any free one), retrying a busy port for BIND_RETRY_SECONDS."""
    deadline = time.monotonic() + BIND_RETRY_SECONDS
    while True:
        try:
            return await loop.create_server(factory, HOST, port, reuse_address=True)
        except OSError:
            if port == 0 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripted_smtp", description=__doc__.splitlines()[0])
    parser.add_argument("--journal", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True, help="written with the bound port")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (the first start)")
    parser.add_argument("--think", type=float, default=0.2, help="seconds between DATA and its reply")
    arguments = parser.parse_args(argv)
    asyncio.run(serve(arguments.journal, arguments.port_file, arguments.port, arguments.think))


if __name__ == "__main__":
    main()
