"""The POP3 client's errors, and the mapping from a server's -ERR reply (and its RFC 2449 code) to one.

Kept apart from the client (`pop3.py`) so the tree a caller catches is read in one place;
`services.fetcher.pop3` re-exports every name here. `retriable` (as on aiokafka's errors) says
whether the same call may succeed later:

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

Secrets: `Pop3Error.redacted` and `redacting` blank a password, token or APOP digest (and its base64
forms) out of an error's message and the server reply it quotes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Final, Literal, Self, TypeVar

from services.fetcher.pop3_protocol import (
    Recovery,
    RemoteProtocolError,
    Reply,
    classify_response_code,
    response_code,
)
from services.runtime.secrets import redact

IN_USE_RETRY_AFTER: Final = 60.0  # killed sessions can keep the maildrop lock for minutes
LOGIN_DELAY_RETRY_AFTER: Final = 300.0  # when the server did not advertise LOGIN-DELAY seconds
_T = TypeVar("_T")
_R = TypeVar("_R")


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
def redacting(*secrets: str) -> Iterator[None]:
    """Errors raised inside the block come out with the secrets blanked out."""
    try:
        yield
    except Pop3Error as exc:
        raise exc.redacted(secrets) from None


def parsed(parse: Callable[[_T], _R], data: _T) -> _R:
    """`parse(data)`, a malformed reply raised as the client's Pop3ProtocolError."""
    try:
        return parse(data)
    except RemoteProtocolError as exc:
        raise Pop3ProtocolError(f"pop3: {exc}") from None
