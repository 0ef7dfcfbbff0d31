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

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Self

import pytest
from aiosmtpd.controller import Controller
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


class _SinkSMTP(SMTP):
    # aiosmtpd refuses DATA lines over 1001 octets; the sink records bytes instead of policing
    # RFC 5321's line limit, so a client that forwards long lines unchanged can be checked byte for byte.
    line_length_limit = DATA_SIZE_LIMIT


class _SinkController(Controller):
    def factory(self) -> SMTP:
        return _SinkSMTP(self.handler, **self.SMTP_kwargs)


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
        self._controller: Controller | None = None
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

    def wait_for(self, count: int, timeout: float = DEFAULT_WAIT) -> list[ReceivedMessage]:
        """Block until at least `count` messages were accepted; fail the test after `timeout` seconds."""
        journal = self._journal
        with journal.changed:
            if not journal.changed.wait_for(lambda: len(journal.messages) >= count, timeout):
                raise AssertionError(
                    f"the SMTP sink accepted {len(journal.messages)} of {count} messages within {timeout} s"
                )
            return list(journal.messages)

    def start(self) -> None:
        self._port = _free_port()
        self._controller = _SinkController(
            _Handler(self, self._journal),
            hostname=HOST,
            port=self._port,
            server_hostname="smtp-sink.localhost",  # no getfqdn() lookup
            decode_data=False,
            enable_SMTPUTF8=True,
            data_size_limit=DATA_SIZE_LIMIT,
        )
        self._controller.start()

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A fresh SMTP sink for one test, accepting everything until the test sets `rcpt_reply`/`data_reply`."""
    with SmtpSink() as sink:
        yield sink
