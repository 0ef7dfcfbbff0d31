"""The SMTP/LMTP adapter: hands one message to the organisation's mail server, one verdict per recipient.

aiosmtplib opens each session: the connection, implicit TLS or STARTTLS (certificates verified by
default, TLS 1.2 or newer), EHLO (LHLO for LMTP) and AUTH: PLAIN or LOGIN with the password, or XOAUTH2
(Exchange Online) with a bearer token fetched afresh for every session from the injected `token` source.
The mail transactions then run on a small reply reader of our own on the same transport, because
aiosmtplib reads exactly one reply per command, and both PIPELINING (MAIL and every RCPT in one write)
and LMTP (one reply per accepted recipient after the data) have several replies in flight. Sessions are
reused, with RSET between messages, up to `SmtpTarget.connections` in parallel. A message for more than
`SmtpTarget.max_recipients_per_transaction` recipients goes out in several transactions on its session
(RSET between them; a session lost on the way is reopened once for the rest).

Errors: `SmtpTransport.deliver` raises nothing for what the server or the network does; each such event
becomes a verdict (see outcome.py). A session that cannot be opened defers every recipient:

    SessionError             (internal; becomes "deferred" for every recipient of the message)
     |-- connect             refused, unreachable, timed out, TLS handshake or certificate failure
     |-- greeting / EHLO     a non-2xx reply
     |-- STARTTLS            not offered although configured, or refused
     `-- AUTH                no PLAIN/LOGIN (or XOAUTH2) offered, the credentials were refused, or the
                             token source failed (CredentialError)
The password and the token are never part of a message, a log line or an event.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, cast, runtime_checkable

import aiosmtplib

from services.deliverer.envelope import Envelope, Extensions, plan, transactions, wire_data
from services.deliverer.outcome import Conversation, Reply, Verdict, outcomes, unreachable
from services.runtime.secrets import CredentialError, redact
from services.runtime.settings import ConfigError, SmtpTarget

logger = logging.getLogger(__name__)

_MAX_REPLY_BYTES = 64 * 1024
_RSET_TIMEOUT = 10.0
# How long QUIT waits for the connection to be gone (a TLS close_notify exchange) before aborting it.
_CLOSE_TIMEOUT = 5.0

TokenSource = Callable[[], Awaitable[str]]


@runtime_checkable
class RenewableToken(Protocol):
    """A TokenSource that can replace a token the server refused (popbridge's own OAuth2 tokens,
    services.runtime.oauth2_tokens.TokenSource): asked once after a refused AUTH XOAUTH2."""

    async def __call__(self) -> str: ...

    async def renew(self) -> str: ...
"""Returns a current OAuth2 bearer token; raises CredentialError (or ConfigError) naming the source only."""


class SessionError(Exception):
    """A session could not be opened or kept: `reason` for the event, `reply` when the server gave one."""

    def __init__(self, reason: str, reply: Reply | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


class _LostError(Exception):
    """The conversation cannot go on: no reply in time, the connection is gone or the reply is garbage."""


def xoauth2_response(username: str, token: str) -> bytes:
    """The SASL XOAUTH2 initial response, base64-encoded: user=U ^A auth=Bearer T ^A ^A."""
    return base64.b64encode(f"user={username}\x01auth=Bearer {token}\x01\x01".encode())


def tls_context(target: SmtpTarget) -> ssl.SSLContext:
    """Verification on by default (with `ca_file` as the only trust anchor when set); TLS 1.2 or newer."""
    context = ssl.create_default_context(cafile=target.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not target.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


AIOSMTPLIB_CHECKED = ("5.1",)
"""The aiosmtplib releases (major.minor) whose internals `open_transport` was checked against."""


def open_transport(client: aiosmtplib.SMTP) -> asyncio.Transport | None:
    """The asyncio transport under aiosmtplib's open connection, or None when it is gone.

    The one place that relies on aiosmtplib beyond its documented API, on purpose: aiosmtplib has no
    public way to hand a connection over, and it reads one reply per command, so PIPELINING and LMTP's
    per-recipient replies cannot go through it (see the module docstring). It reads `SMTP.protocol` and
    `SMTPProtocol.transport`: attributes without an underscore but not documented, so a release may
    rename them. tests/unit/deliverer/test_aiosmtplib_seam.py checks them on a live connection and fails
    on a release not in AIOSMTPLIB_CHECKED, so an upgrade is a visible decision, never a silent break.
    """
    protocol = client.protocol
    transport = None if protocol is None else protocol.transport
    return None if transport is None else cast(asyncio.Transport, transport)


class _ReplyReader(asyncio.Protocol):
    """Reads every reply the server sends into a queue, so several can be in flight at once."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._replies: deque[Reply] = deque()
        self._arrived = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._gone = asyncio.Event()
        self.lost: str | None = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1]).rstrip(b"\r\n")
            del self._buffer[: end + 1]
            self._take(line)
        if len(self._buffer) > _MAX_REPLY_BYTES:
            self._fail("the server sent a reply line that is too long")
        self._arrived.set()

    def _take(self, line: bytes) -> None:
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            self._fail(f"the server sent a malformed reply: {line[:80]!r}")
            return
        self._lines.append(line)
        if line[3:4] != b"-":
            text = "\n".join(part[4:].decode("utf-8", "replace").strip() for part in self._lines)
            self._replies.append(Reply(int(line[:3]), text))
            self._lines = []

    def _fail(self, reason: str) -> None:
        self.lost = self.lost or reason
        self.transport.close()

    def eof_received(self) -> bool:
        self.lost = self.lost or "the server closed the connection"
        self._arrived.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.lost or f"the connection was lost{f': {exc}' if exc else ''}"
        self._arrived.set()
        self._writable.set()
        self._gone.set()

    async def closed(self, seconds: float) -> None:
        """Close and wait until the connection is gone. Over TLS, close() only starts the close_notify
        exchange and the socket goes when it ends: a caller that stops its event loop before that leaks
        the socket. A peer that does not answer in time is cut off."""
        self.transport.close()
        try:
            await asyncio.wait_for(self._gone.wait(), seconds)
        except TimeoutError:
            self.transport.abort()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def write(self, data: bytes) -> None:
        if self.lost is not None or self.transport.is_closing():
            raise _LostError(self.lost or "the connection is closed")
        self.transport.write(data)

    async def drain(self) -> None:
        await self._writable.wait()

    async def reply(self, seconds: float) -> Reply:
        """The next reply; _LostError when none comes within `seconds` or the connection ends first."""
        while not self._replies:
            if self.lost is not None:
                raise _LostError(self.lost)
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), seconds)
            except TimeoutError:
                self.transport.close()
                raise _LostError(f"no reply from the server within {seconds:g} s") from None
        return self._replies.popleft()


def _command(verb: bytes, address: str, params: Sequence[str]) -> bytes:
    path = verb + b"<" + address.encode("utf-8") + b">"
    return b" ".join([path, *(p.encode("ascii") for p in params)]) + b"\r\n"


@dataclass
class _Heard:
    """The replies of one transaction so far."""

    mail: Reply | None = None
    rcpts: list[Reply] = field(default_factory=list)
    data: Reply | None = None
    finals: list[Reply] = field(default_factory=list)


class _Session:
    """One open session after EHLO/LHLO (and STARTTLS, AUTH): runs mail transactions one after another."""

    def __init__(self, reader: _ReplyReader, extensions: Extensions, *, timeout: float, lmtp: bool) -> None:
        self.reader = reader
        self.extensions = extensions
        self.timeout = timeout
        self.lmtp = lmtp

    @property
    def usable(self) -> bool:
        return self.reader.lost is None and not self.reader.transport.is_closing()

    async def transact(self, envelope: Envelope, data: bytes) -> Conversation:
        """MAIL, RCPT for each recipient, DATA and the message; as far as the server and network allow."""
        heard = _Heard()
        broken = None
        try:
            await self._transact(envelope, data, heard)
        except _LostError as exc:
            self.close()
            broken = str(exc)
        return Conversation(recipients=envelope.recipients, lmtp=self.lmtp, mail=heard.mail,
                            rcpts=tuple(heard.rcpts), data=heard.data, finals=tuple(heard.finals),
                            broken=broken)

    async def _transact(self, envelope: Envelope, data: bytes, heard: _Heard) -> None:
        mail = _command(b"MAIL FROM:", envelope.sender, envelope.mail_params)
        rcpts = [_command(b"RCPT TO:", r, envelope.rcpt_params[r]) for r in envelope.recipients]
        pipelining = self.extensions.has("pipelining")
        self.reader.write(mail + b"".join(rcpts) if pipelining else mail)
        heard.mail = await self.reader.reply(self.timeout)
        if heard.mail.code // 100 != 2 and not pipelining:
            return
        for rcpt in rcpts:
            if not pipelining:
                self.reader.write(rcpt)
            heard.rcpts.append(await self.reader.reply(self.timeout))
        accepted = sum(1 for reply in heard.rcpts if reply.code // 100 == 2)
        if heard.mail.code // 100 != 2 or not accepted:
            return
        self.reader.write(b"DATA\r\n")
        heard.data = await self.reader.reply(self.timeout)
        if heard.data.code != 354:
            return
        self.reader.write(data)
        await self.reader.drain()
        for _ in range(accepted if self.lmtp else 1):
            heard.finals.append(await self.reader.reply(self.timeout))

    async def reset(self) -> bool:
        """RSET before the next message; False when the session is no longer good for one."""
        try:
            self.reader.write(b"RSET\r\n")
            return (await self.reader.reply(min(self.timeout, _RSET_TIMEOUT))).code // 100 == 2
        except _LostError:
            return False

    async def quit(self) -> None:
        try:
            self.reader.write(b"QUIT\r\n")
            await self.reader.reply(min(self.timeout, _RSET_TIMEOUT))
        except (_LostError, TimeoutError):
            pass  # closing anyway
        finally:
            await self.reader.closed(min(self.timeout, _CLOSE_TIMEOUT))

    def close(self) -> None:
        self.reader.transport.close()


class SmtpTransport:
    """Delivers messages to one SMTP or LMTP server over a small pool of reused sessions."""

    def __init__(self, target: SmtpTarget, password: str | None = None, *,
                 context: ssl.SSLContext | None = None, token: TokenSource | None = None) -> None:
        self.target = target
        self._password = password
        self._token = token
        self._last_token = ""  # blanked out of server replies along with the password
        # Built on the first session, and only for a TLS target: loading the system's CA certificates
        # took ~1 s of a contended `popbridge run` start (py-spy, bench/e2e.py) with tls = "none".
        self._context = context
        self._idle: list[_Session] = []
        self._slots = asyncio.Semaphore(target.connections)

    def __repr__(self) -> str:  # never the password
        return f"SmtpTransport({self.server!r}, {self.target.protocol})"

    @property
    def server(self) -> str:
        return f"{self.target.host}:{self.target.port}"

    async def __aenter__(self) -> SmtpTransport:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(session.quit() for session in idle))

    async def deliver(self, sender: str, recipients: Sequence[str], message: bytes) -> dict[str, Verdict]:
        """Hand `message` over for `recipients`; one verdict per recipient, never an exception."""
        async with self._slots:
            try:
                session = await self._session()
            except SessionError as exc:
                return dict.fromkeys(recipients, unreachable(exc.reason, exc.reply))
            envelope = plan(sender, recipients, message, session.extensions)
            verdicts = dict(envelope.refused)
            kept = await self._transactions(session, envelope, wire_data(message), verdicts)
            if kept is not None and kept.usable:
                self._idle.append(kept)
            elif kept is not None:
                kept.close()
            return {recipient: verdicts[recipient] for recipient in recipients}

    async def _transactions(self, session: _Session, envelope: Envelope, data: bytes,
                            verdicts: dict[str, Verdict]) -> _Session | None:
        """Each transaction of at most max_recipients_per_transaction RCPTs; verdicts go into `verdicts`.

        Returns the session to keep, or None when it could not be reopened (the rest is deferred).
        """
        current: _Session | None = session
        parts = transactions(envelope, self.target.max_recipients_per_transaction)
        try:
            for index, part in enumerate(parts):
                if index and current is not None and not await current.reset():
                    current.close()
                    current = None
                if current is None:
                    try:
                        current = await self._open()
                    except SessionError as exc:
                        rest = [r for later in parts[index:] for r in later.recipients]
                        verdicts.update(dict.fromkeys(rest, unreachable(exc.reason, exc.reply)))
                        return None
                verdicts.update(outcomes(await current.transact(part, data)))
        except BaseException:  # cancelled mid-transaction: the session is in an unknown state
            if current is not None:
                current.close()
            raise
        return current

    async def _session(self) -> _Session:
        while self._idle:
            session = self._idle.pop()
            if await session.reset():
                return session
            session.close()
        return await self._open()

    async def _open(self) -> _Session:
        target = self.target
        client = aiosmtplib.SMTP(
            hostname=target.host, port=target.port, local_hostname=target.helo_name, timeout=target.timeout,
            use_tls=target.tls == "implicit", start_tls=False, tls_context=self._tls_context(),
        )
        step = "connect"
        try:
            await client.connect()
            step = "LHLO" if target.protocol == "lmtp" else "EHLO"
            await self._hello(client)
            if target.tls == "starttls":
                step = "STARTTLS"
                await self._starttls(client)
                step = "LHLO" if target.protocol == "lmtp" else "EHLO"
                await self._hello(client)
            if target.username:
                step = "AUTH"
                await self._login(client, target.username)
        except SessionError:
            client.close()
            raise
        except aiosmtplib.SMTPResponseException as exc:
            client.close()
            raise SessionError(f"{step} refused", Reply(exc.code, self._blank(exc.message))) from None
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
            client.close()
            raise SessionError(self._blank(f"{step}: {type(exc).__name__}: {exc}")) from None
        except BaseException:  # a failing token command, a cancellation: never leave the socket open
            client.close()
            raise
        return self._take_over(client)

    def _tls_context(self) -> ssl.SSLContext | None:
        if self.target.tls == "none":
            return None
        if self._context is None:
            self._context = tls_context(self.target)
        return self._context

    def _blank(self, text: str) -> str:
        """A server's words with the password and the token blanked out, plain or base64 (a server may
        echo what it was sent)."""
        return redact(text, (self._password or "", self._last_token))

    async def _hello(self, client: aiosmtplib.SMTP) -> None:
        name = client.local_hostname or "localhost"
        if self.target.protocol == "lmtp":
            response = await client.execute_command(b"LHLO", name.encode("ascii"))
            if response.code != 250:
                raise aiosmtplib.SMTPHeloError(response.code, response.message)
            client.last_ehlo_response = response
            return
        try:
            await client.ehlo(hostname=name)
        except aiosmtplib.SMTPHeloError:
            if not client.is_connected:
                raise
            await client.helo(hostname=name)

    @staticmethod
    async def _starttls(client: aiosmtplib.SMTP) -> None:
        if not client.supports_extension("starttls"):
            raise SessionError('STARTTLS: not offered by the server, and tls = "starttls" is set')
        await client.starttls()

    async def _login(self, client: aiosmtplib.SMTP, username: str) -> None:
        if self.target.auth == "xoauth2":
            await self._xoauth2(client, username)
            return
        password = self._password or ""
        if "plain" in client.server_auth_methods:
            await client.auth_plain(username, password)
        elif "login" in client.server_auth_methods:
            await client.auth_login(username, password)
        else:
            raise SessionError("AUTH: the server offers neither PLAIN nor LOGIN")

    async def _xoauth2(self, client: aiosmtplib.SMTP, username: str) -> None:
        """AUTH XOAUTH2 with the initial response; a 334 (error details) is answered with an empty line."""
        if "xoauth2" not in client.server_auth_methods:
            raise SessionError("AUTH: the server does not offer XOAUTH2")
        if self._token is None:
            raise SessionError("AUTH: auth = \"xoauth2\" but no token source was configured")
        response = await self._send_xoauth2(client, username, self._token)
        if response.code != 235 and isinstance(self._token, RenewableToken):
            response = await self._send_xoauth2(client, username, self._token.renew)  # once (RFC 4954 allows)
        if response.code != 235:
            raise aiosmtplib.SMTPAuthenticationError(response.code, response.message)

    async def _send_xoauth2(self, client: aiosmtplib.SMTP, username: str, token_source: TokenSource
                            ) -> aiosmtplib.SMTPResponse:
        try:
            token = self._last_token = await token_source()
        except (CredentialError, ConfigError) as exc:
            raise SessionError(f"AUTH: {exc}") from None
        response = await client.execute_command(b"AUTH", b"XOAUTH2", xoauth2_response(username, token))
        if response.code == 334:
            response = await client.execute_command(b"")
        return response

    def _take_over(self, client: aiosmtplib.SMTP) -> _Session:
        """Move the open transport from aiosmtplib's protocol to our reply reader."""
        transport = open_transport(client)
        if transport is None:
            raise SessionError("the connection was lost after the greeting")
        reader = _ReplyReader(transport)
        transport.set_protocol(reader)
        extensions = Extensions(dict(client.esmtp_extensions))
        return _Session(reader, extensions, timeout=self.target.timeout, lmtp=self.target.protocol == "lmtp")
