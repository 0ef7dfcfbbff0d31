"""An SMTP sink on loopback (aiosmtpd) that records every transaction byte for byte, as a pytest fixture.

The sink speaks ESMTP with 8BITMIME, SMTPUTF8 and SIZE (64 MiB). What it answers is injectable, so
delivery tests can make it defer or refuse: `rcpt_reply(address)` and `data_reply(message)` return an
SMTP reply line such as "450 4.2.0 try later", or None to accept.

The recorded `content` is what the client sent between DATA and the final ".", with the transparency
dots removed (RFC 5321 4.5.2) and nothing else changed: aiosmtpd splits DATA only at CRLF, so a bare
LF or CR is kept, and `decode_data=False` keeps 8-bit bytes. (With `decode_data=False`, aiosmtpd's
`envelope.content` and `envelope.original_content` are the same bytes.) A "." right after a bare LF
is not at the start of an SMTP line, so if the client stuffed it, the extra dot is recorded.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

HOST = "127.0.0.1"
DATA_SIZE_LIMIT = 64 * 1024 * 1024
DEFAULT_WAIT = 10.0


@dataclass(frozen=True, kw_only=True)
class ReceivedMessage:
    """One SMTP transaction the sink accepted (or, in `SmtpSink.refused`, answered with `reply`)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    mail_options: tuple[str, ...] = ()
    reply: str = "250 OK"


@dataclass(frozen=True, kw_only=True)
class RefusedRecipient:
    """A RCPT TO the sink answered with `reply` instead of accepting it."""

    address: str
    reply: str


RcptReply = Callable[[str], str | None]
DataReply = Callable[[ReceivedMessage], str | None]


def accept_all(_: object) -> None:
    """The default reply policy: accept every recipient and every message."""


class DataGate:
    """A `data_reply` that holds every DATA (in the sink's thread) until `open` is set, then accepts it;
    `reached` is set by the first one, so a test knows a batch is in SMTP. `hold` bounds each wait."""

    def __init__(self, hold: float = 120.0) -> None:
        self.hold = hold
        self.reached = threading.Event()
        self.open = threading.Event()

    def __call__(self, _: ReceivedMessage) -> None:
        self.reached.set()
        self.open.wait(self.hold)


class _SinkSMTP(SMTP):
    # aiosmtpd refuses DATA lines over 1001 octets; the sink records bytes instead of policing
    # RFC 5321's line limit, so a client that forwards long lines unchanged can be checked byte for byte.
    line_length_limit = DATA_SIZE_LIMIT


ProtocolFactory = Callable[[asyncio.AbstractEventLoop], SMTP]
"""Builds one aiosmtpd protocol (SMTP, LMTP or a subclass) for a connection, on the server's loop."""

START_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0  # seconds the server waits for its open connections to close when it stops


class SmtpServer:
    """aiosmtpd's protocol served on a loopback port the OS picks, on a thread with its own event loop.

    aiosmtpd's Controller cannot bind port 0 (it connects to its own port to check the server), so
    tests would pick a free port and bind it later, a race with every other process on the machine.
    Here the listening socket is bound first and its port read back. `stop()` closes every open
    connection and waits for it to go before closing the loop: a transport left open would warn at
    garbage collection, in whichever later test that happens."""

    def __init__(self, factory: ProtocolFactory) -> None:
        self._factory = factory
        self._loop = asyncio.new_event_loop()
        self._protocols: list[tuple[SMTP, asyncio.Future[None]]] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="smtp-server", daemon=True)
        self._problem: BaseException | None = None
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    def start(self) -> int:
        """Serve; returns the port once the socket listens."""
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError(f"the SMTP server did not start within {START_TIMEOUT} s")
        if self._problem is not None:
            self._thread.join()
            raise self._problem
        return self.port

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def _protocol(self) -> SMTP:
        protocol = self._factory(self._loop)
        lost = self._loop.create_future()
        self._protocols.append((protocol, lost))
        connection_lost = protocol.connection_lost

        def report_lost(error: Exception | None) -> None:
            try:
                connection_lost(error)
            finally:
                if not lost.done():
                    lost.set_result(None)

        protocol.connection_lost = report_lost  # type: ignore[method-assign]  # an instance hook, not a patch of aiosmtpd
        return protocol

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(self._loop.create_server(self._protocol, HOST, 0))
            self.port = int(self._server.sockets[0].getsockname()[1])
        except BaseException as problem:  # reported to start(), on the test's thread
            self._problem = problem
            self._loop.close()
            return
        finally:
            self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._close())
        self._loop.close()

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for protocol, _ in self._protocols:
            if protocol.transport is not None:
                protocol.transport.close()
        pending = [lost for _, lost in self._protocols if not lost.done()]
        if pending:  # connection_lost runs on a later turn of the loop
            await asyncio.wait(pending, timeout=CLOSE_TIMEOUT)
        await self._server.wait_closed()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextmanager
def serve_smtp(factory: ProtocolFactory) -> Iterator[int]:
    """Serve aiosmtpd protocols from `factory` on a free loopback port for the block; yields the port."""
    server = SmtpServer(factory)
    port = server.start()
    try:
        yield port
    finally:
        server.stop()


def smtp_protocol(handler: object, cls: type[SMTP] = SMTP, **smtp_kwargs: Any) -> ProtocolFactory:
    """A factory of `cls(handler, **smtp_kwargs)` on the server's loop, for `serve_smtp`."""
    return lambda loop: cls(handler, loop=loop, **smtp_kwargs)


class _Handler:
    """aiosmtpd hooks; they run on the controller's thread and report to the sink."""

    def __init__(self, sink: SmtpSink, journal: _Journal) -> None:
        self._sink = sink
        self._journal = journal

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self._sink.rcpt_reply(address)
        if reply is not None:
            self._journal.add_refused_recipient(RefusedRecipient(address=address, reply=reply))
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=envelope.original_content or b"",
            mail_options=tuple(envelope.mail_options),
        )
        reply = self._sink.data_reply(message) or "250 OK"
        self._journal.add_transaction(replace(message, reply=reply))
        return reply


class _Journal:
    """What the sink saw, shared between the controller's thread and the test's."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.messages: list[ReceivedMessage] = []
        self.refused: list[ReceivedMessage] = []
        self.refused_recipients: list[RefusedRecipient] = []

    def add_transaction(self, message: ReceivedMessage) -> None:
        with self.changed:
            (self.messages if message.reply.startswith("2") else self.refused).append(message)
            self.changed.notify_all()

    def add_refused_recipient(self, refusal: RefusedRecipient) -> None:
        with self.changed:
            self.refused_recipients.append(refusal)
            self.changed.notify_all()


class SmtpSink:
    """An aiosmtpd server on a free loopback port; `start()`/`stop()` it or use `with`.

    `messages` are the transactions that got a 2xx reply to DATA, in arrival order; `refused` those
    that did not; `refused_recipients` every RCPT answered by `rcpt_reply`.
    """

    def __init__(self, *, rcpt_reply: RcptReply = accept_all, data_reply: DataReply = accept_all) -> None:
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply
        self._journal = _Journal()
        self._server: SmtpServer | None = None
        self._port = 0

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A snapshot of the accepted transactions."""
        with self._journal.changed:
            return list(self._journal.messages)

    @property
    def refused(self) -> list[ReceivedMessage]:
        with self._journal.changed:
            return list(self._journal.refused)

    @property
    def refused_recipients(self) -> list[RefusedRecipient]:
        with self._journal.changed:
            return list(self._journal.refused_recipients)

    def wait_for(
        self, count: int, timeout: float = DEFAULT_WAIT, *, recipient: str | None = None
    ) -> list[ReceivedMessage]:
        """Block until at least `count` messages were accepted (for `recipient` when given: copies with it
        on their envelope); fail the test after `timeout` seconds."""
        journal = self._journal

        def counted() -> int:
            return sum(recipient is None or recipient in m.rcpt_tos for m in journal.messages)

        with journal.changed:
            if not journal.changed.wait_for(lambda: counted() >= count, timeout):
                whose = f" for {recipient}" if recipient else ""
                raise AssertionError(
                    f"the SMTP sink accepted {counted()} of {count} messages{whose} within {timeout} s"
                )
            return list(journal.messages)

    def wait_for_refusals(self, count: int, timeout: float = DEFAULT_WAIT) -> list[RefusedRecipient]:
        """Block until `rcpt_reply` refused at least `count` recipients; fail the test after `timeout` s."""
        journal = self._journal
        with journal.changed:
            if not journal.changed.wait_for(lambda: len(journal.refused_recipients) >= count, timeout):
                raise AssertionError(
                    f"the SMTP sink refused {len(journal.refused_recipients)} of {count} recipients within "
                    f"{timeout} s"
                )
            return list(journal.refused_recipients)

    def start(self) -> None:
        self._server = SmtpServer(smtp_protocol(
            _Handler(self, self._journal),
            _SinkSMTP,
            hostname="smtp-sink.localhost",  # no getfqdn() lookup
            decode_data=False,
            enable_SMTPUTF8=True,
            data_size_limit=DATA_SIZE_LIMIT,
        ))
        self._port = self._server.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()


def unused_port() -> int:
    """A loopback port nothing listened on a moment ago: for a test of a refused connection only."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A fresh SMTP sink for one test, accepting everything until the test sets `rcpt_reply`/`data_reply`."""
    with SmtpSink() as sink:
        yield sink
