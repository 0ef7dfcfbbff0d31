"""A tiny POP3 server (RFC 1939: USER/PASS, STAT, LIST, UIDL, RETR, DELE, RSET, NOOP, QUIT, CAPA) for
`popbridge demo` on a machine without Dovecot. One mailbox, held in memory, on a loopback port.

It is a demo prop, not a mail server: no TLS, no locking beyond "one session at a time", and deletions
take effect at QUIT (the UPDATE state), as the protocol says, so a dropped session deletes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.demo.listener import HOST, Listener

MAX_LINE = 512


def stored_form(raw: bytes) -> bytes:
    """A message as the maildrop serves it: CRLF line endings, ending in CRLF."""
    lines = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return lines if lines.endswith(b"\r\n") else lines + b"\r\n"


def stuffed(message: bytes) -> bytes:
    """The multi-line RETR body: leading dots doubled, then the terminating `.` line."""
    body = (b"." + message) if message.startswith(b".") else message
    return body.replace(b"\r\n.", b"\r\n..") + b".\r\n"


@dataclass
class Maildrop:
    """The mailbox: (UIDL, message) in arrival order."""

    login: str
    password: str
    messages: list[tuple[str, bytes]] = field(default_factory=list)

    def add(self, raw: bytes) -> None:
        self.messages.append((secrets.token_hex(8), stored_form(raw)))


class _Session:
    """One POP3 session over a stream pair: AUTHORIZATION, then TRANSACTION, then UPDATE at QUIT."""

    def __init__(self, drop: Maildrop, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.drop = drop
        self.reader = reader
        self.writer = writer
        self.user: str | None = None
        self.authorized = False
        self.view: list[tuple[str, bytes]] = []
        self.deleted: set[int] = set()

    async def serve(self) -> None:
        self.writer.write(b"+OK popbridge demo POP3 ready\r\n")
        while line := await self.reader.readline():
            verb, _, argument = line[:MAX_LINE].decode("ascii", "replace").strip().partition(" ")
            if not await self._answer(verb.upper(), argument.strip()):
                break
            await self.writer.drain()
        await self.writer.drain()

    async def _answer(self, verb: str, argument: str) -> bool:
        if verb == "QUIT":
            self._update()
            self.writer.write(b"+OK bye\r\n")
            return False
        if verb == "CAPA":
            self.writer.write(b"+OK\r\nUSER\r\nUIDL\r\nPIPELINING\r\n.\r\n")
        elif not self.authorized:
            self._authorize(verb, argument)
        else:
            self._transact(verb, argument)
        return True

    def _authorize(self, verb: str, argument: str) -> None:
        if verb == "USER":
            self.user = argument
            self.writer.write(b"+OK\r\n")
        elif verb == "PASS" and self.user == self.drop.login and argument == self.drop.password:
            self.authorized = True
            self.view = list(self.drop.messages)
            self.writer.write(b"+OK logged in\r\n")
        else:
            self.writer.write(b"-ERR [AUTH] authentication failed\r\n")

    def _transact(self, verb: str, argument: str) -> None:
        live = {n: m for n, m in enumerate(self.view, start=1) if n not in self.deleted}
        number = int(argument) if argument.isdigit() else None
        if verb in ("LIST", "UIDL") and number is None:
            rows = (f"{n} {len(m) if verb == 'LIST' else uidl}\r\n" for n, (uidl, m) in live.items())
            self.writer.write(b"+OK\r\n" + "".join(rows).encode() + b".\r\n")
        elif verb == "STAT":
            self.writer.write(f"+OK {len(live)} {sum(len(m) for _, m in live.values())}\r\n".encode())
        elif verb in ("NOOP", "RSET"):
            self.deleted = set() if verb == "RSET" else self.deleted
            self.writer.write(b"+OK\r\n")
        elif number not in live:
            self.writer.write(b"-ERR no such message\r\n")
        else:
            self._message_command(verb, number, live[number])

    def _message_command(self, verb: str, number: int, message: tuple[str, bytes]) -> None:
        uidl, raw = message
        if verb == "RETR":
            self.writer.write(f"+OK {len(raw)} octets\r\n".encode() + stuffed(raw))
        elif verb == "DELE":
            self.deleted.add(number)
            self.writer.write(b"+OK deleted\r\n")
        elif verb == "LIST":
            self.writer.write(f"+OK {number} {len(raw)}\r\n".encode())
        elif verb == "UIDL":
            self.writer.write(f"+OK {number} {uidl}\r\n".encode())
        else:
            self.writer.write(b"-ERR unknown command\r\n")

    def _update(self) -> None:
        gone = {self.view[n - 1][0] for n in self.deleted}
        self.drop.messages = [(uidl, m) for uidl, m in self.drop.messages if uidl not in gone]


class DemoPop3Server:
    """The maildrop served on a free loopback port; `async with` starts and stops it."""

    def __init__(self, login: str, password: str, messages: Sequence[bytes] = ()) -> None:
        self.drop = Maildrop(login, password)
        for raw in messages:
            self.drop.add(raw)
        self._listener = Listener()
        self._lock = asyncio.Lock()
        self.host = HOST
        self.port = 0

    @property
    def remaining(self) -> int:
        return len(self.drop.messages)

    async def __aenter__(self) -> DemoPop3Server:
        self.port = await self._listener.open(self._session, HOST)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._listener.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with self._lock:  # one session at a time: the maildrop lock of RFC 1939
                await _Session(self.drop, reader, writer).serve()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing was updated
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
