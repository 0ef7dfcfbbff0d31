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

Every await is bounded by an idle `timeout` and a per-reply `command_deadline`, and every reply by a
byte cap (RETR and TOP `max_message_bytes`, fixed caps for the listings); see `pop3_channel`. Both
limits end the session (Pop3LimitError). The errors, and what each asks of the caller, are drawn as a
tree in `pop3_errors`; this module re-exports them (`X as X`), so a caller imports the client from here.

The client is split along its seams: this module holds the session (greeting, STLS, authentication,
the transaction commands and pipelining); `pop3_channel` the connection (TLS, bytes, flow control,
deadlines); `pop3_errors` the error tree.

Secrets: no message, repr or log line built here contains a password, token or APOP digest. Replies
to authentication commands are quoted, but with any echo of the secret blanked out.
"""

from __future__ import annotations

import base64
import binascii
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from types import TracebackType
from typing import Final, Literal, Self

from services.fetcher.pop3_channel import Channel, open_channel
from services.fetcher.pop3_channel import tls_context as tls_context
from services.fetcher.pop3_errors import Pop3AuthError as Pop3AuthError
from services.fetcher.pop3_errors import Pop3CommandError as Pop3CommandError
from services.fetcher.pop3_errors import Pop3Error as Pop3Error
from services.fetcher.pop3_errors import Pop3LimitError as Pop3LimitError
from services.fetcher.pop3_errors import Pop3PermanentError as Pop3PermanentError
from services.fetcher.pop3_errors import Pop3ProtocolError as Pop3ProtocolError
from services.fetcher.pop3_errors import Pop3RetryLater as Pop3RetryLater
from services.fetcher.pop3_errors import Pop3TemporaryError as Pop3TemporaryError
from services.fetcher.pop3_errors import Pop3TlsError as Pop3TlsError
from services.fetcher.pop3_errors import error_for_reply, parsed, redacting
from services.fetcher.pop3_protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Capabilities,
    Challenge,
    Command,
    Event,
    Pop3Connection,
    Reply,
    apop_digest,
    command,
    greeting_timestamp,
    parse_capabilities,
    parse_list,
    parse_stat,
    parse_uidl,
    sasl_plain,
    sasl_start,
    sasl_xoauth2,
)

log = logging.getLogger(__name__)

TlsMode = Literal["implicit", "starttls", "none"]
DEFAULT_TIMEOUT: Final = 30.0
DEFAULT_COMMAND_DEADLINE: Final = 300.0  # seconds one reply may take in all
DEFAULT_WINDOW: Final = 16  # RETR/DELE commands in flight when the server offers PIPELINING


class Pop3Client:
    """A POP3 session. Build it with `connect` and use it with `async with`; see the module docstring."""

    def __init__(self, channel: Channel, core: Pop3Connection, *, pipelining: bool, window: int) -> None:
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
        channel = await open_channel(
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
            self._caps = parsed(parse_capabilities, reply.body or b"") if reply.ok else Capabilities()
            self._login_delay = self._caps.login_delay or self._login_delay
        return self._caps

    # authentication

    async def login(self, username: str, password: str) -> None:
        """USER/PASS (RFC 1939 section 7)."""
        with redacting(password):
            await self._ok(command("USER", username), unknown=Pop3AuthError)
            await self._ok(command("PASS", password), unknown=Pop3AuthError)
        self._authenticated()

    async def apop(self, username: str, secret: str) -> None:
        """APOP with the MD5 digest of the greeting's timestamp and the shared secret."""
        timestamp = greeting_timestamp(self.greeting)
        if timestamp is None:
            raise Pop3AuthError("pop3: the greeting has no APOP timestamp; the server does not offer APOP")
        digest = apop_digest(timestamp, secret)
        with redacting(secret, digest):
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
        return parsed(parse_stat, (await self._ok(command("STAT"))).text)

    async def uidl(self) -> dict[int, str]:
        """Message number -> unique id, for every message not marked deleted."""
        return parsed(parse_uidl, await self._body(command("UIDL")))

    async def list(self) -> dict[int, int]:
        """Message number -> size in octets as the server counts them."""
        return parsed(parse_list, await self._body(command("LIST")))

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
        with redacting(*secrets):
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
