"""popbridge's POP3 client: a thin asyncio adapter around the state machine in `pop3_protocol`.

    async with await Pop3Client.connect("pop.example.net", 995, tls="implicit") as client:
        await client.login("user", password)
        async for number, raw in client.retr_many(sorted(await client.uidl())):
            ...  # store it somewhere durable first
            await client.dele(number)  # may interleave with the pipelined RETRs
        await client.quit()  # commits the DELEs

Leaving the block without `quit()` only drops the connection, so the server keeps every message
(RFC 1939 section 6: deletions happen in the UPDATE state, after QUIT). That is deliberate: a crash
between DELE and QUIT must never lose mail. A `Pop3Client` is used by one task at a time.

Every await is bounded twice. `timeout` is the idle limit: connecting, the TLS handshake, each write
that has to wait, and each reply fail when the server makes no progress for that long. `command_deadline`
bounds each reply in all, however the bytes trickle: a server sending one byte a second cannot hold a
session longer than that. Every reply also has a byte cap (`pop3_protocol.reply_cap`): RETR and TOP
`max_message_bytes`, fixed caps for the listings. Both limits end the session (Pop3LimitError).

Errors; `retriable` (as on aiokafka's errors) says whether the same call may succeed later:

                               retriable
    Pop3Error                             base: `server_reply` is the server's text, `code` its [CODE]
     +-- Pop3AuthError           no       [AUTH], or an -ERR to USER/PASS/APOP/AUTH: fix the
     |                                    credentials or the method; do not retry fast
     +-- Pop3RetryLater          yes      [IN-USE] (another session holds the maildrop) or
     |                                    [LOGIN-DELAY]: back off for `retry_after` seconds
     +-- Pop3TemporaryError      yes      [SYS/TEMP], a timeout, a refused or dropped connection
     +-- Pop3PermanentError      no       [SYS/PERM]: needs an administrator
     +-- Pop3TlsError            no       certificate, hostname or handshake failure; or STLS
     |                                    requested but not offered (never continued in clear)
     +-- Pop3ProtocolError       no       the server's bytes are not POP3; the connection is closed
     |    +-- Pop3LimitError     no       a reply outgrew its byte cap or its command deadline; the
     |                                    connection is closed (`keyword` names the command)
     +-- Pop3CommandError        no       any other -ERR, e.g. RETR of a message that is gone

`pop3_protocol.LocalProtocolError` (a ValueError) is not wrapped: it means an argument POP3 cannot carry
(CR/LF in it, a command over 255 octets), a configuration error or a bug.

Secrets: no message, repr or log line built here contains a password, token or APOP digest. Replies
to authentication commands are quoted, but with any echo of the secret blanked out.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from types import TracebackType
from typing import Final, Literal, Self, TypeVar, cast

from services.fetcher.pop3_protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Capabilities,
    Challenge,
    Command,
    Event,
    Pop3Connection,
    Recovery,
    RemoteProtocolError,
    Reply,
    ReplyTooLargeError,
    apop_digest,
    classify_response_code,
    command,
    greeting_timestamp,
    parse_capabilities,
    parse_list,
    parse_stat,
    parse_uidl,
    response_code,
    sasl_plain,
    sasl_start,
    sasl_xoauth2,
)
from services.runtime.secrets import redact

log = logging.getLogger(__name__)

TlsMode = Literal["implicit", "starttls", "none"]
DEFAULT_TIMEOUT: Final = 30.0
DEFAULT_COMMAND_DEADLINE: Final = 300.0  # seconds one reply may take in all
DEFAULT_WINDOW: Final = 16  # RETR/DELE commands in flight when the server offers PIPELINING
IN_USE_RETRY_AFTER: Final = 60.0  # killed sessions can keep the maildrop lock for minutes
LOGIN_DELAY_RETRY_AFTER: Final = 300.0  # when the server did not advertise LOGIN-DELAY seconds
_READ_HIGH_WATER: Final = 16 * 1024 * 1024  # received replies not yet taken by the caller
_CLOSE_TIMEOUT: Final = 5.0
_T = TypeVar("_T")
_R = TypeVar("_R")


# --- Errors --------------------------------------------------------------------------------------


class Pop3Error(Exception):
    """Base of the POP3 client errors; see the tree in the module docstring."""

    retriable: bool = False

    def __init__(self, message: str, *, server_reply: str | None = None) -> None:
        super().__init__(message)
        self.server_reply = server_reply

    @property
    def code(self) -> str | None:
        """The RFC 2449 response code of the server's reply, e.g. `IN-USE`."""
        return response_code(self.server_reply) if self.server_reply else None

    def redacted(self, secrets: Iterable[str]) -> Self:
        """A copy of this error with every occurrence of the secrets blanked out."""
        secrets = [s for s in secrets if s]
        clean = type(self).__new__(type(self))
        clean.__dict__.update(self.__dict__)
        clean.args = tuple(_blank(str(a), secrets) for a in self.args)
        if self.server_reply is not None:
            clean.server_reply = _blank(self.server_reply, secrets)
        return clean


class Pop3AuthError(Pop3Error):
    """The server rejected the credentials or the authentication method."""


class Pop3RetryLater(Pop3Error):  # noqa: N818 - names what the caller does, like the other classes
    """The maildrop is in use or logins are too frequent: try again after `retry_after` seconds."""

    retriable = True

    def __init__(self, message: str, *, server_reply: str | None = None, retry_after: float) -> None:
        super().__init__(message, server_reply=server_reply)
        self.retry_after = retry_after


class Pop3TemporaryError(Pop3Error):
    """A passing failure: [SYS/TEMP], a timeout, a refused or dropped connection."""

    retriable = True


class Pop3PermanentError(Pop3Error):
    """[SYS/PERM]: the server says the problem needs an administrator."""


class Pop3TlsError(Pop3Error):
    """TLS could not be established (certificate, hostname, handshake, or no STLS on offer)."""


class Pop3ProtocolError(Pop3Error):
    """The server sent something that is not POP3."""


class Pop3LimitError(Pop3ProtocolError):
    """The reply to `keyword` outgrew its byte cap (`exceeded` "bytes") or its overall deadline ("time");
    the session is over."""

    def __init__(self, message: str, *, keyword: str, exceeded: Literal["bytes", "time"]) -> None:
        super().__init__(message)
        self.keyword = keyword
        self.exceeded = exceeded


class Pop3CommandError(Pop3Error):
    """The server answered -ERR without a code we can act on."""


def _blank(text: str, secrets: list[str]) -> str:
    return redact(text, secrets)  # the plain secret and its base64 forms


def error_for_reply(
    reply: Reply,
    *,
    unknown: type[Pop3Error] = Pop3CommandError,
    login_delay: int | None = None,
    challenge: str = "",
) -> Pop3Error:
    """The error for an -ERR reply, from its response code; `unknown` is used when there is none.

    `challenge` is what a SASL server said before the -ERR (XOAUTH2 sends a JSON status there).
    """
    message = f"pop3 {reply.keyword} refused: -ERR {reply.text}"
    if challenge:
        message += f" (server challenge: {challenge})"
    recovery = classify_response_code(reply.code)
    if recovery is Recovery.RETRY_LATER:
        return Pop3RetryLater(message, server_reply=reply.text, retry_after=_retry_after(reply, login_delay))
    error_type = {
        Recovery.TRANSIENT: Pop3TemporaryError,
        Recovery.NEEDS_ADMIN: Pop3PermanentError,
        Recovery.CREDENTIALS: Pop3AuthError,
    }.get(recovery, unknown)
    return error_type(message, server_reply=reply.text)


def _retry_after(reply: Reply, login_delay: int | None) -> float:
    if reply.code and reply.code.startswith("LOGIN-DELAY"):
        return float(login_delay) if login_delay else LOGIN_DELAY_RETRY_AFTER
    return IN_USE_RETRY_AFTER


@contextmanager
def _redacting(*secrets: str) -> Iterator[None]:
    try:
        yield
    except Pop3Error as exc:
        raise exc.redacted(secrets) from None


def _parsed(parse: Callable[[_T], _R], data: _T) -> _R:
    try:
        return parse(data)
    except RemoteProtocolError as exc:
        raise Pop3ProtocolError(f"pop3: {exc}") from None


# --- TLS -----------------------------------------------------------------------------------------


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


# --- The channel: bytes to the state machine, replies to the client ------------------------------


class _Channel(asyncio.Protocol):
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


async def _open_channel(
    core: Pop3Connection, host: str, port: int, *, context: ssl.SSLContext | None, server_hostname: str,
    timeout: float, command_deadline: float,
) -> _Channel:  # fmt: skip
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            _, channel = await loop.create_connection(
                lambda: _Channel(core, timeout, command_deadline), host, port, ssl=context,
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


# --- The client ----------------------------------------------------------------------------------


class Pop3Client:
    """A POP3 session. Build it with `connect` and use it with `async with`; see the module docstring."""

    def __init__(self, channel: _Channel, core: Pop3Connection, *, pipelining: bool, window: int) -> None:
        self._channel = channel
        self._core = core
        self._allow_pipelining = pipelining
        self._window = max(1, window)
        self._caps: Capabilities | None = None
        self._login_delay: int | None = None
        self._wire_owner: _Pipeline | None = None  # the pipeline whose replies are still on the wire
        self.greeting = ""

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        tls: TlsMode = "implicit",
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        pipelining: bool = True,
        window: int = DEFAULT_WINDOW,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        command_deadline: float = DEFAULT_COMMAND_DEADLINE,
    ) -> Pop3Client:
        """Connect, read the greeting and, for `tls="starttls"`, upgrade with STLS (fail closed).

        `server_hostname` is the name the certificate must carry (default: `host`). `pipelining=False`
        sends one command at a time even when the server offers PIPELINING. `max_message_bytes` caps
        a RETR or TOP reply, `command_deadline` the time any reply may take (see the module docstring).
        """
        if tls not in ("implicit", "starttls", "none"):
            raise ValueError(f"tls must be 'implicit', 'starttls' or 'none', not {tls!r}")  # never fall open
        context = (ssl_context or tls_context()) if tls != "none" else None
        hostname = server_hostname or host
        implicit = context if tls == "implicit" else None
        core = Pop3Connection(max_message_bytes=max_message_bytes)
        channel = await _open_channel(
            core, host, port, context=implicit, server_hostname=hostname, timeout=timeout,
            command_deadline=command_deadline,
        )  # fmt: skip
        client = cls(channel, core, pipelining=pipelining, window=window)
        try:
            await client._greet()
            if tls == "starttls":
                assert context is not None
                await client._starttls(context, hostname)
        except BaseException:
            channel.abort()
            raise
        return client

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def encrypted(self) -> bool:
        """Whether the session runs over TLS (implicit or after STLS)."""
        return self._channel.encrypted

    async def capabilities(self, *, refresh: bool = False) -> Capabilities:
        """The CAPA reply, cached until authentication or STLS; empty if the server has no CAPA."""
        if self._caps is None or refresh:
            reply = await self._request(command("CAPA"))
            self._caps = _parsed(parse_capabilities, reply.body or b"") if reply.ok else Capabilities()
            self._login_delay = self._caps.login_delay or self._login_delay
        return self._caps

    # authentication

    async def login(self, username: str, password: str) -> None:
        """USER/PASS (RFC 1939 section 7)."""
        with _redacting(password):
            await self._ok(command("USER", username), unknown=Pop3AuthError)
            await self._ok(command("PASS", password), unknown=Pop3AuthError)
        self._authenticated()

    async def apop(self, username: str, secret: str) -> None:
        """APOP with the MD5 digest of the greeting's timestamp and the shared secret."""
        timestamp = greeting_timestamp(self.greeting)
        if timestamp is None:
            raise Pop3AuthError("pop3: the greeting has no APOP timestamp; the server does not offer APOP")
        digest = apop_digest(timestamp, secret)
        with _redacting(secret, digest):
            await self._ok(command("APOP", username, digest), unknown=Pop3AuthError)
        self._authenticated()

    async def auth_plain(self, username: str, password: str, authzid: str = "") -> None:
        """SASL PLAIN; the initial response rides on the AUTH line when it fits in 255 octets."""
        blob = sasl_plain(username, password, authzid)
        start, pending = sasl_start("PLAIN", blob)
        answers = [b"*"] if pending is None else [pending, b"*"]  # `*` cancels an unexpected challenge
        await self._sasl(start, answers, secrets=(password, blob.decode()))

    async def auth_xoauth2(self, username: str, token: str) -> None:
        """XOAUTH2 in the two-step form Microsoft 365 requires: `AUTH XOAUTH2`, `+`, then the blob.

        A failure arrives as a challenge with a base64 JSON status; the empty answer to it
        fetches the final -ERR (Google's and Microsoft's documented exchange).
        """
        blob = sasl_xoauth2(username, token)
        await self._sasl(command("AUTH", "XOAUTH2"), [blob, b""], secrets=(token, blob.decode()))

    # transaction

    async def stat(self) -> tuple[int, int]:
        """(message count, maildrop size in octets)."""
        return _parsed(parse_stat, (await self._ok(command("STAT"))).text)

    async def uidl(self) -> dict[int, str]:
        """Message number -> unique id, for every message not marked deleted."""
        return _parsed(parse_uidl, await self._body(command("UIDL")))

    async def list(self) -> dict[int, int]:
        """Message number -> size in octets as the server counts them."""
        return _parsed(parse_list, await self._body(command("LIST")))

    async def retr(self, number: int) -> bytes:
        """The message exactly as sent, dot-stuffing removed, every line ending in CRLF."""
        return await self._body(command("RETR", number))

    async def retr_many(self, numbers: Iterable[int]) -> AsyncIterator[tuple[int, bytes]]:
        """(number, message) in the order given; pipelined when the server offers PIPELINING.

        Other commands may be sent between iterations (e.g. a DELE after each message is safely
        stored), and stopping early is safe: the replies already requested are read first.
        """
        async for number, message in self.retr_each(numbers):
            if isinstance(message, Pop3Error):
                raise message
            yield number, message

    async def retr_each(self, numbers: Iterable[int]) -> AsyncIterator[tuple[int, bytes | Pop3Error]]:
        """As `retr_many`, but a message the server refuses (-ERR) comes as its error and the rest
        follows; a failure of the session itself (a dropped line, a limit) still raises."""
        async for number, reply in self._pipeline("RETR", numbers, await self._pipeline_window()):
            yield number, _body_of(reply) if reply.ok else error_for_reply(reply)

    async def dele(self, number: int) -> None:
        """Mark a message deleted; the server removes it only after `quit()`."""
        await self._ok(command("DELE", number))

    async def dele_many(self, numbers: Iterable[int]) -> None:
        """DELE each message, pipelined when offered; raises the first refusal after all replies."""
        refusals = [
            reply
            async for _, reply in self._pipeline("DELE", numbers, await self._pipeline_window())
            if not reply.ok
        ]
        if refusals:
            raise error_for_reply(refusals[0])

    async def noop(self) -> None:
        await self._ok(command("NOOP"))

    async def quit(self) -> None:
        """QUIT: the server removes the messages marked deleted, then the connection closes."""
        try:
            reply = await self._request(command("QUIT"))
        finally:
            await self.close()
        if not reply.ok:
            raise error_for_reply(reply)

    async def close(self) -> None:
        """Drop the connection without QUIT: nothing marked deleted is removed."""
        await self._channel.close()

    # internals

    async def _greet(self) -> None:
        reply = await self._next_reply()
        if not reply.ok:
            raise error_for_reply(reply, unknown=Pop3TemporaryError)
        self.greeting = reply.text

    async def _starttls(self, context: ssl.SSLContext, hostname: str) -> None:
        if not (await self.capabilities()).stls:
            raise Pop3TlsError("pop3: STLS was requested but the server does not offer it; not continuing")
        reply = await self._request(command("STLS"))
        if not reply.ok:
            raise Pop3TlsError(f"pop3: STLS refused: -ERR {reply.text}", server_reply=reply.text)
        await self._channel.start_tls(context, hostname)
        self._caps = None
        await self.capabilities()  # RFC 2595 section 4: what was learnt in clear text is discarded

    def _authenticated(self) -> None:
        self._caps = None  # capabilities may change after login (RFC 2449 section 5)

    async def _sasl(self, start: Command, answers: Sequence[bytes], secrets: tuple[str, ...]) -> None:
        """Run one SASL exchange, answering successive challenges with `answers` in order."""
        with _redacting(*secrets):
            event = await self._send(self._core.send(start))
            said = ""
            for answer in answers:
                if isinstance(event, Reply):
                    break
                said = _challenge_text(event) or said
                event = await self._send(self._core.send_sasl_response(answer))
            if isinstance(event, Challenge):
                self._channel.abort()
                raise Pop3ProtocolError("pop3: the server kept sending SASL challenges")
            if not event.ok:
                raise error_for_reply(
                    event, unknown=Pop3AuthError, login_delay=self._login_delay, challenge=said
                )
        self._authenticated()

    async def _pipeline_window(self) -> int:
        return self._window if self._allow_pipelining and (await self.capabilities()).pipelining else 1

    async def _pipeline(
        self, keyword: str, numbers: Iterable[int], window: int
    ) -> AsyncIterator[tuple[int, Reply]]:
        """Keep up to `window` commands in flight, each refill in one write; replies come in order.

        Other commands may be sent between iterations (a DELE after each RETR, or an early stop
        followed by anything): they first read this pipeline's replies into `read_ahead`, so the
        session stays in step and nothing here has to await when the caller abandons the iteration.
        """
        state = _Pipeline()
        todo = iter(numbers)
        while True:
            if len(state.in_flight) <= window // 2:
                await self._send_batch(state, list(islice(todo, window - len(state.in_flight))), keyword)
            if not state.in_flight:
                return
            reply = state.read_ahead.popleft() if state.read_ahead else await self._next_reply()
            yield state.in_flight.popleft(), reply

    async def _send_batch(self, state: _Pipeline, numbers: Sequence[int], keyword: str) -> None:
        if not numbers:
            return
        await self._settle(keep=state)
        await self._channel.write(self._core.send_many(command(keyword, n) for n in numbers))
        state.in_flight.extend(numbers)
        self._wire_owner = state

    async def _settle(self, keep: _Pipeline | None = None) -> None:
        """Before another command goes out, read what an earlier pipeline is owed into its read-ahead."""
        owner, self._wire_owner = self._wire_owner, keep
        if owner is None or owner is keep:
            return
        for _ in range(owner.on_the_wire):
            owner.read_ahead.append(await self._next_reply())

    async def _next_reply(self) -> Reply:
        return _as_reply(await self._channel.next_event())

    async def _write(self, data: bytes) -> None:
        if data:
            await self._channel.write(data)

    async def _send(self, data: bytes) -> Event:
        await self._settle()
        await self._channel.write(data)
        return await self._channel.next_event()

    async def _request(self, cmd: Command) -> Reply:
        log.debug("pop3 C: %r", cmd)
        return _as_reply(await self._send(self._core.send(cmd)))

    async def _ok(self, cmd: Command, *, unknown: type[Pop3Error] = Pop3CommandError) -> Reply:
        reply = await self._request(cmd)
        if not reply.ok:
            raise error_for_reply(reply, unknown=unknown, login_delay=self._login_delay)
        return reply

    async def _body(self, cmd: Command) -> bytes:
        return _body_of(await self._ok(cmd))


@dataclass
class _Pipeline:
    """One retr_many/dele_many iteration: numbers sent and not yet handed over, replies read ahead."""

    in_flight: deque[int] = field(default_factory=deque)
    read_ahead: deque[Reply] = field(default_factory=deque)

    @property
    def on_the_wire(self) -> int:
        return len(self.in_flight) - len(self.read_ahead)


def _as_reply(event: Event) -> Reply:
    if isinstance(event, Challenge):  # the core reports `+ ` only after AUTH, so this is a bug
        raise Pop3ProtocolError(f"pop3: unexpected SASL challenge after {event.keyword}")
    return event


def _body_of(reply: Reply) -> bytes:
    if reply.body is None:
        raise Pop3ProtocolError(f"pop3: {reply.keyword} answered without a body")
    return reply.body


def _challenge_text(challenge: Challenge) -> str:
    try:
        return base64.b64decode(challenge.data, validate=True).decode("utf-8", "replace")[:200]
    except binascii.Error:
        return challenge.data.decode("ascii", "replace")[:200]
