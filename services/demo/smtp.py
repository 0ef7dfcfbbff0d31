"""A tiny SMTP receiver for `popbridge demo`: accepts every transaction on a loopback port and records it.

It stands in for the organisation's mail server, so the demo needs nothing installed. It speaks just
enough ESMTP for the deliverer (EHLO, PIPELINING, 8BITMIME, SIZE, MAIL, RCPT, DATA, RSET, NOOP, QUIT);
it relays nothing anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass

from services.demo.listener import HOST, Listener

MAX_SIZE = 64 * 1024 * 1024
_PATH = re.compile(r"^(?:FROM|TO):\s*<([^>]*)>", re.IGNORECASE)
_EHLO = f"250-demo-smtp.localhost\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE {MAX_SIZE}"
_SIMPLE = {
    "EHLO": _EHLO, "LHLO": _EHLO, "HELO": "250 demo-smtp.localhost", "NOOP": "250 OK", "RSET": "250 OK",
    "QUIT": "221 bye",
}


@dataclass(frozen=True)
class ReceivedMail:
    """One accepted transaction."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes


class _Session:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, inbox: list[ReceivedMail]
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.inbox = inbox
        self.sender: str | None = None
        self.recipients: list[str] = []

    async def serve(self) -> None:
        self.writer.write(b"220 demo-smtp.localhost ESMTP popbridge demo receiver\r\n")
        while line := await self.reader.readline():
            verb, _, argument = line.decode("utf-8", "replace").rstrip("\r\n").partition(" ")
            reply = await self._answer(verb.upper(), argument)
            self.writer.write(reply.encode() + b"\r\n")
            await self.writer.drain()
            if reply.startswith("221"):
                return

    async def _answer(self, verb: str, argument: str) -> str:
        if verb == "RSET":
            self.sender, self.recipients = None, []
        if verb in _SIMPLE:
            return _SIMPLE[verb]
        path = _PATH.match(argument)
        if verb == "MAIL" and path:
            self.sender, self.recipients = path.group(1), []
            return "250 OK"
        if verb == "RCPT" and path and self.sender is not None:
            self.recipients.append(path.group(1))
            return "250 OK"
        if verb == "DATA" and self.recipients:
            return await self._data()
        return "503 5.5.1 bad sequence of commands" if verb in ("MAIL", "RCPT", "DATA") else "502 5.5.2 no"

    async def _data(self) -> str:
        self.writer.write(b"354 end with <CRLF>.<CRLF>\r\n")
        await self.writer.drain()
        lines: list[bytes] = []
        while (line := await self.reader.readline()) not in (b".\r\n", b""):
            lines.append(line[1:] if line.startswith(b".") else line)
        self.inbox.append(ReceivedMail(self.sender or "", tuple(self.recipients), b"".join(lines)))
        self.sender, self.recipients = None, []
        return "250 2.0.0 OK: queued"


class DemoSmtpServer:
    """Records every message it accepts in `received`; `async with` starts and stops it."""

    def __init__(self) -> None:
        self.received: list[ReceivedMail] = []
        self._listener = Listener()
        self.host = HOST
        self.port = 0

    async def __aenter__(self) -> DemoSmtpServer:
        self.port = await self._listener.open(self._session, HOST, limit=MAX_SIZE)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._listener.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _Session(reader, writer, self.received).serve()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away mid-transaction: nothing was accepted
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
