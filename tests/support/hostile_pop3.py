"""A scripted POP3 server on loopback that misbehaves on demand, for the hostile-server tests.

It serves one maildrop (USER/PASS, CAPA, STAT, LIST, UIDL, RETR, DELE, RSET, NOOP, QUIT; deletions at
QUIT, as RFC 1939 says) and lets a test replace any reply by a `Script`: an endless body, bytes that
trickle, an -ERR, silence. Each message carries the UIDL the server lists for it (any bytes, hostile ones
included) and the size LIST claims for it, so a test can list duplicates, ids with spaces, 200 KB ids,
or a 1 KB claim for a 60 MB message.

    async with HostilePop3Server([Message(b"..."), Message(b"...", retr=endless())]) as server:
        ...  # connect to server.host, server.port with LOGIN / PASSWORD

Replies to a connection go out in order, one command at a time; with `pipelining` CAPA offers
PIPELINING, so the client sends several commands ahead. Every session task is cancelled when the server
stops, so an endless script never outlives its test.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from services.demo.listener import HOST, Listener
from services.demo.pop3 import stored_form, stuffed
from services.runtime.settings import Mailbox

LOGIN = "victim"
PASSWORD = "hostile-test-password"
PASSWORD_ENV = "HOSTILE_POP3_PASSWORD"  # where a stage under test reads PASSWORD
MB = 1_000_000
MAX_COMMAND_LINE = 512

Script = Callable[[asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Message:
    """One message of the maildrop: its bytes, the UIDL listed for it, what LIST claims, how RETR answers."""

    content: bytes
    uidl: bytes | None = None  # None: a unique one is made up
    listed_size: int | None = None  # None: the true size
    retr: Script | None = None  # None: the message, dot-stuffed

    def __post_init__(self) -> None:
        self.content = stored_form(self.content)

    @property
    def size(self) -> int:
        return len(self.content) if self.listed_size is None else self.listed_size


# --- Scripts ---------------------------------------------------------------------------------------


def endless(line: bytes = b"x" * 998 + b"\r\n") -> Script:
    """+OK, then the same line forever, as fast as the client reads."""

    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK here it comes\r\n")
        chunk = line * max(1, 65536 // len(line))
        while True:
            writer.write(chunk)
            await writer.drain()

    return script


def endless_listing() -> Script:
    """+OK, then listing lines `n id-n` without end (for UIDL or LIST: both parse as a listing)."""

    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK\r\n")
        for start in itertools.count(1, 1000):
            writer.write(b"".join(b"%d %d\r\n" % (n, n) for n in range(start, start + 1000)))
            await writer.drain()

    return script


def trickle(data: bytes, interval: float) -> Script:
    """`data`, then one byte every `interval` seconds, forever (each byte restarts an idle timer)."""

    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        while True:
            await asyncio.sleep(interval)  # the misbehaviour itself: a server this slow
            writer.write(b"x")
            await writer.drain()

    return script


def reply(line: bytes) -> Script:
    """One fixed reply line, e.g. `reply(b"-ERR [SYS/PERM] cannot read message")`."""

    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(line + b"\r\n")
        await writer.drain()

    return script


def silence() -> Script:
    """No reply at all: the session hangs until the client gives up."""

    async def script(writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    return script


# --- The server ------------------------------------------------------------------------------------


@dataclass
class HostilePop3Server:
    """The maildrop on a free loopback port; `async with` starts it and stops every session."""

    messages: list[Message]
    greeting: Script | None = None
    uidl_reply: Script | None = None  # replaces the whole UIDL listing
    list_reply: Script | None = None  # replaces the whole LIST listing
    pipelining: bool = False
    host: str = HOST
    port: int = 0
    commands: list[bytes] = field(default_factory=list)
    sessions: int = 0
    open_sessions: int = 0
    _listener: Listener = field(default_factory=Listener, init=False)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition, init=False)
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1), init=False)

    def __post_init__(self) -> None:
        for message in self.messages:
            self._name(message)

    def add(self, message: Message) -> None:
        self.messages.append(self._name(message))

    def _name(self, message: Message) -> Message:
        if message.uidl is None:
            message.uidl = b"uid-%d" % next(self._counter)
        return message

    @property
    def contents(self) -> list[bytes]:
        return [m.content for m in self.messages]

    async def __aenter__(self) -> Self:
        self.port = await self._listener.open(self._accept, self.host)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._listener.close()

    async def wait_for(self, condition: Callable[[HostilePop3Server], bool]) -> None:
        """Return once `condition(self)` holds (checked when a session opens, closes or sends a command)."""
        async with self._changed:
            await self._changed.wait_for(lambda: condition(self))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        self.open_sessions += 1
        await self._notify()
        try:
            await _Session(self, reader, writer).serve()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away (or cut us off at a limit): nothing is updated
        finally:
            self.open_sessions -= 1
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            with contextlib.suppress(asyncio.CancelledError):
                await self._notify()


class _Session:
    def __init__(self, server: HostilePop3Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.user: bytes | None = None
        self.authorized = False
        self.view: Sequence[Message] = ()
        self.deleted: set[int] = set()

    async def serve(self) -> None:
        await self._run(self.server.greeting, b"+OK hostile POP3 ready\r\n")
        while line := await self.reader.readline():
            verb, _, argument = line[:MAX_COMMAND_LINE].strip().partition(b" ")
            self.server.commands.append(line.strip())
            await self.server._notify()
            if not await self._answer(verb.upper(), argument.strip()):
                return
            await self.writer.drain()

    async def _run(self, script: Script | None, default: bytes) -> None:
        if script is None:
            self.writer.write(default)
        else:
            await script(self.writer)
        await self.writer.drain()

    async def _answer(self, verb: bytes, argument: bytes) -> bool:
        if verb == b"QUIT":
            gone = {id(self.view[n - 1]) for n in self.deleted}
            self.server.messages[:] = [m for m in self.server.messages if id(m) not in gone]
            self.writer.write(b"+OK bye\r\n")
            await self.writer.drain()
            return False
        if verb == b"CAPA":
            offer = b"PIPELINING\r\n" if self.server.pipelining else b""
            self.writer.write(b"+OK\r\nUSER\r\nUIDL\r\n" + offer + b".\r\n")
        elif verb == b"USER":
            self.user = argument
            self.writer.write(b"+OK\r\n")
        elif verb == b"PASS":
            await self._login(argument)
        elif not self.authorized:
            self.writer.write(b"-ERR not logged in\r\n")
        else:
            await self._transact(verb, argument)
        return True

    async def _login(self, password: bytes) -> None:
        if self.user == LOGIN.encode() and password == PASSWORD.encode():
            self.authorized = True
            self.view = list(self.server.messages)
            self.writer.write(b"+OK logged in\r\n")
        else:
            self.writer.write(b"-ERR [AUTH] no\r\n")

    def _live(self) -> dict[int, Message]:
        return {n: m for n, m in enumerate(self.view, start=1) if n not in self.deleted}

    async def _transact(self, verb: bytes, argument: bytes) -> None:
        live = self._live()
        if verb == b"UIDL" and not argument:
            rows = b"".join(b"%d %s\r\n" % (n, m.uidl or b"") for n, m in live.items())
            await self._run(self.server.uidl_reply, b"+OK\r\n" + rows + b".\r\n")
        elif verb == b"LIST" and not argument:
            rows = b"".join(b"%d %d\r\n" % (n, m.size) for n, m in live.items())
            await self._run(self.server.list_reply, b"+OK\r\n" + rows + b".\r\n")
        elif verb == b"STAT":
            self.writer.write(b"+OK %d %d\r\n" % (len(live), sum(m.size for m in live.values())))
        elif verb in (b"NOOP", b"RSET"):
            self.deleted = set() if verb == b"RSET" else self.deleted
            self.writer.write(b"+OK\r\n")
        elif not argument.isdigit() or int(argument) not in live:
            self.writer.write(b"-ERR no such message\r\n")
        elif verb == b"RETR":
            message = live[int(argument)]
            default = b"+OK %d octets\r\n" % len(message.content) + stuffed(message.content)
            await self._run(message.retr, default)
        elif verb == b"DELE":
            self.deleted.add(int(argument))
            self.writer.write(b"+OK deleted\r\n")
        else:
            self.writer.write(b"-ERR unknown command\r\n")


def mail(n: int, size: int = 2_000) -> bytes:
    """Message `n` (its Message-ID and subject say n) of about `size` bytes, to alice@example.com."""
    head = (
        f"From: a@example.test\r\nTo: alice@example.com\r\nMessage-ID: <m{n}@test>\r\nSubject: m{n}\r\n\r\n"
    )
    line = f"message {n} ".encode().ljust(70, b"x") + b"\r\n"
    return head.encode() + line * max(1, size // len(line))


def mailbox(server: HostilePop3Server, mailbox_id: str = "box", **overrides: Any) -> Mailbox:
    """A single-user mailbox on `server` in clear text, with short limits (5 s idle, 10 s a reply, 1 MB)."""
    fields: dict[str, Any] = {
        "id": mailbox_id, "host": server.host, "port": server.port, "tls": "none", "username": LOGIN,
        "password_env": PASSWORD_ENV, "recipients": ("alice@example.com",), "timeout": 5.0,
        "command_deadline": 10.0, "max_message_size": MB,
    }  # fmt: skip
    fields.update(overrides)
    return Mailbox(**fields)
