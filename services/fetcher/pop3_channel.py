"""The POP3 client's connection: TLS context, and the asyncio protocol that feeds received bytes to the
state machine in `pop3_protocol` and hands its replies to the client (`pop3.py`).

Every await is bounded twice. `timeout` is the idle limit: connecting, the TLS handshake, each write
that has to wait, and each reply fail when the server makes no progress for that long. `command_deadline`
bounds each reply in all, however the bytes trickle: a server sending one byte a second cannot hold a
session longer than that. Both end the session; the byte caps are the core's (`pop3_protocol.reply_cap`).
Received replies not yet taken by the client are bounded too (`_READ_HIGH_WATER`): reading pauses above it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from typing import Final, cast

from services.fetcher.pop3_errors import (
    Pop3Error,
    Pop3LimitError,
    Pop3ProtocolError,
    Pop3TemporaryError,
    Pop3TlsError,
)
from services.fetcher.pop3_protocol import (
    Event,
    Pop3Connection,
    RemoteProtocolError,
    Reply,
    ReplyTooLargeError,
)

_READ_HIGH_WATER: Final = 16 * 1024 * 1024  # received replies not yet taken by the caller
_CLOSE_TIMEOUT: Final = 5.0


def tls_context(ca_file: str | None = None, verify: bool = True) -> ssl.SSLContext:
    """A client context: TLS 1.2 or later (RFC 8997), certificate and hostname checked.

    `ca_file` replaces the system trust store (a private CA). `verify=False` turns both checks off;
    the caller must log that it did.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context



class Channel(asyncio.Protocol):
    """One connection: feeds received bytes to the core, queues its replies, does flow control."""

    def __init__(self, core: Pop3Connection, timeout: float, command_deadline: float) -> None:
        self._core = core
        self._timeout = timeout
        self._command_deadline = command_deadline
        self._hard_deadline = 0.0  # loop time at which the reply waited for now is over, however it trickles
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._events: deque[Event] = deque()
        self._queued_bytes = 0
        self._failure: Pop3Error | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._deadline: asyncio.Timeout | None = None
        self._write_paused = False
        self._reading_paused = False
        self.closed = self._loop.create_future()

    @property
    def transport(self) -> asyncio.Transport:
        assert self._transport is not None  # set by connection_made before anyone holds the channel
        return self._transport

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # commands are tiny

    def data_received(self, data: bytes) -> None:
        try:
            events = self._core.receive_data(data)
        except ReplyTooLargeError as exc:
            self._fail(Pop3LimitError(f"pop3: {exc}", keyword=exc.keyword, exceeded="bytes"))
            self.transport.abort()
            return
        except RemoteProtocolError as exc:
            self._fail(Pop3ProtocolError(f"pop3: {exc}"))
            self.transport.abort()
            return
        if self._deadline is not None and not self._deadline.expired():
            self._deadline.reschedule(self._next_timeout())  # the server is not stalled
        if events:
            self._events.extend(events)
            self._queued_bytes += sum(len(e.body or b"") for e in events if isinstance(e, Reply))
            self._pause_if_full()
            self._wake()

    def eof_received(self) -> None:
        self._fail(Pop3TemporaryError("pop3: the server closed the connection"))

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._fail(Pop3TemporaryError(f"pop3: the connection was lost{reason}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # used by the client

    async def next_event(self) -> Event:
        self._hard_deadline = self._loop.time() + self._command_deadline
        while not self._events:
            if self._failure is not None:
                raise self._failure
            await self._wait("a reply")
        event = self._events.popleft()
        if isinstance(event, Reply):
            self._queued_bytes -= len(event.body or b"")
        self._resume_if_drained()
        return event

    async def write(self, data: bytes) -> None:
        """Write in one call; wait (bounded) only when the transport asks us to slow down."""
        if self._failure is not None:
            raise self._failure
        self.transport.write(data)
        self._hard_deadline = self._loop.time() + self._command_deadline
        while self._write_paused and self._failure is None:
            await self._wait("the server to read our commands")

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                new = await self._loop.start_tls(
                    self.transport, self, context, server_hostname=server_hostname,
                    ssl_handshake_timeout=self._timeout,
                )  # fmt: skip
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise Pop3TlsError(f"pop3: TLS handshake failed: {exc}") from None
        except (TimeoutError, OSError) as exc:
            raise Pop3TemporaryError(f"pop3: TLS handshake failed: {exc!r}") from None
        if new is None:
            raise Pop3TemporaryError("pop3: the connection closed during the TLS handshake")
        self._transport = new
        self._core.tls_established()

    async def close(self) -> None:
        if self._transport is None:
            return
        self._transport.close()
        try:
            async with asyncio.timeout(min(self._timeout, _CLOSE_TIMEOUT)):
                await asyncio.shield(self.closed)
        except TimeoutError:
            self._transport.abort()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    @property
    def encrypted(self) -> bool:
        return self._transport is not None and self._transport.get_extra_info("ssl_object") is not None

    # internals

    async def _wait(self, what: str) -> None:
        if self._waiter is not None:
            raise RuntimeError("a Pop3Client is used by one task at a time")
        self._waiter = self._loop.create_future()
        try:
            async with asyncio.timeout_at(self._next_timeout()) as deadline:
                self._deadline = deadline
                await self._waiter
        except TimeoutError:
            self._fail(self._timed_out(what))
            self.abort()  # the session is out of step now; it cannot be reused
            raise cast(Pop3Error, self._failure) from None
        finally:
            self._waiter = None
            self._deadline = None

    def _next_timeout(self) -> float:
        return min(self._loop.time() + self._timeout, self._hard_deadline)

    def _timed_out(self, what: str) -> Pop3Error:
        if self._loop.time() >= self._hard_deadline:
            keyword = self._core.awaiting or "a command"
            return Pop3LimitError(
                f"pop3: the reply to {keyword} took longer than command_deadline "
                f"({self._command_deadline:g} s) in all", keyword=keyword, exceeded="time",
            )  # fmt: skip
        return Pop3TemporaryError(f"pop3: no progress within {self._timeout:g} s waiting for {what}")

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: Pop3Error) -> None:
        if self._failure is None:
            self._failure = error
        self._wake()

    def _pause_if_full(self) -> None:
        if self._queued_bytes > _READ_HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_if_drained(self) -> None:
        if self._reading_paused and self._queued_bytes <= _READ_HIGH_WATER // 2:
            self._reading_paused = False
            self.transport.resume_reading()


async def open_channel(
    core: Pop3Connection, host: str, port: int, *, context: ssl.SSLContext | None, server_hostname: str,
    timeout: float, command_deadline: float,
) -> Channel:  # fmt: skip
    """Connect (with TLS when `context` is given) within `timeout`; failures as the client's errors."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            _, channel = await loop.create_connection(
                lambda: Channel(core, timeout, command_deadline), host, port, ssl=context,
                server_hostname=server_hostname if context else None,
                ssl_handshake_timeout=timeout if context else None,
            )  # fmt: skip
    except (ssl.SSLError, ssl.CertificateError) as exc:
        raise Pop3TlsError(f"pop3: TLS handshake with {host}:{port} failed: {exc}") from None
    except TimeoutError:
        raise Pop3TemporaryError(f"pop3: connecting to {host}:{port} timed out after {timeout:g} s") from None
    except OSError as exc:
        raise Pop3TemporaryError(f"pop3: cannot connect to {host}:{port}: {exc}") from None
    return channel
