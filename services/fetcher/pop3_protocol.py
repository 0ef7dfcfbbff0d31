"""The POP3 client protocol as a pure state machine: commands in, bytes out; bytes in, replies out.

Over 500 lines on purpose: the whole POP3 wire contract in one pure module, as h11 keeps HTTP/1.1's.

No sockets and no asyncio here (python-hyper/h11 is the model): `Pop3Connection.send` turns a
`Command` into the bytes to write and remembers which reply shape to expect; `receive_data` takes
whatever arrived and returns the replies it completed, in the order the commands were sent, so any
number of commands may be pipelined (RFC 2449 section 6.6). The adapter in `pop3.py` does the I/O.

Replies (RFC 1939 section 3, RFC 2449 section 3, RFC 5034 section 4):
- single-line: `+OK text` / `-ERR [CODE] text`;
- multi-line (`CAPA`, `RETR`, `TOP`, `LIST`/`UIDL` without argument): `+OK`, lines, then `.`; lines
  that start with `.` were dot-stuffed and lose that first dot. The body is returned as the server
  sent it otherwise: every line ending kept, including the CRLF before the terminating `.`;
- SASL continuation after `AUTH`: `+` or `+ base64`.

Errors raised by this module:

    ProtocolError
     +-- LocalProtocolError (also ValueError)   we were asked to send something POP3 cannot carry:
     |                                          a bug or a configuration error; never retried
     +-- RemoteProtocolError                    the server sent something that is not POP3; the
          |                                     connection is unusable (the state machine stops)
          +-- ReplyTooLargeError                     a reply outgrew its byte cap (see `reply_cap`)

Every reply has a byte cap, so an endless or huge reply costs its session, never the memory of the
process: a status line MAX_STATUS_LINE_OCTETS, CAPA MAX_CAPA_BYTES, the UIDL and LIST listings
MAX_UIDL_BYTES and MAX_LIST_BYTES (sized for 100,000 messages), RETR and TOP the connection's
`max_message_bytes` (the caller's size limit plus a margin).

No message produced here contains a command argument, so a password cannot leak through them.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, Literal

MAX_COMMAND_OCTETS: Final = 255  # RFC 2449 section 4, including the terminating CRLF
MAX_STATUS_LINE_OCTETS: Final = 2048  # RFC 1939 allows 512; poplib's _MAXLINE tolerates up to 2048
MAX_CAPA_BYTES: Final = 64 * 1024
# 100,000 messages: "100000 " + a 70-octet unique-id + CRLF is 79 octets a line, "100000 " + octets + CRLF
# at most 21; the caps leave room for longer (invalid) lines and numbering gaps.
MAX_UIDL_BYTES: Final = 16 * 1024 * 1024
MAX_LIST_BYTES: Final = 4 * 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
MAX_UNIQUE_ID_OCTETS: Final = 70  # RFC 1939 section 7: 1 to 70 characters in 0x21..0x7E
_UNIQUE_ID: Final = re.compile(rf"[\x21-\x7e]{{1,{MAX_UNIQUE_ID_OCTETS}}}")
_CRLF: Final = b"\r\n"
_TERMINATOR: Final = b"\r\n.\r\n"


class ProtocolError(Exception):
    """Base of the errors of the POP3 state machine."""


class LocalProtocolError(ProtocolError, ValueError):
    """The command cannot be sent as asked (too long, CR/LF in an argument, sent at the wrong time)."""


class RemoteProtocolError(ProtocolError):
    """The server's bytes are not a POP3 reply (or arrived when no reply was expected)."""


class ReplyTooLargeError(RemoteProtocolError):
    """The reply to `keyword` grew past `limit` bytes; nothing of it is kept."""

    def __init__(self, keyword: str, limit: int) -> None:
        super().__init__(f"reply to {keyword} larger than {limit} bytes")
        self.keyword = keyword
        self.limit = limit


class Shape(Enum):
    """What a command's reply looks like on the wire when it is positive."""

    SINGLE = "single"
    MULTI = "multi"
    SASL = "sasl"  # a continuation (`+ ...`) or a final single-line status


_ALWAYS_MULTI: Final = frozenset({"CAPA", "RETR", "TOP"})
_MULTI_WITHOUT_ARGUMENT: Final = frozenset({"LIST", "UIDL"})
_SENSITIVE: Final = frozenset({"PASS", "APOP", "AUTH"})


@dataclass(frozen=True, slots=True, repr=False)
class Command:
    """One validated command line. `repr` never shows the arguments of PASS, APOP or AUTH."""

    keyword: str
    args: tuple[str, ...] = ()
    line: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "line", _encode(self.keyword, self.args))

    @property
    def shape(self) -> Shape:
        if self.keyword == "AUTH":
            return Shape.SASL
        if self.keyword in _ALWAYS_MULTI or (self.keyword in _MULTI_WITHOUT_ARGUMENT and not self.args):
            return Shape.MULTI
        return Shape.SINGLE

    @property
    def sensitive(self) -> bool:
        return self.keyword in _SENSITIVE

    def __repr__(self) -> str:
        shown = ("<redacted>",) if self.sensitive and self.args else self.args
        return f"Command({' '.join((self.keyword, *shown))!r})"


def command(keyword: str, *args: str | int) -> Command:
    """Build a command, e.g. `command("RETR", 3)`; raises LocalProtocolError if it cannot be sent."""
    return Command(keyword.upper(), tuple(str(a) for a in args))


def _encode(keyword: str, args: tuple[str, ...]) -> bytes:
    if not re.fullmatch(r"[A-Z][A-Z0-9]{2,7}", keyword):
        raise LocalProtocolError(f"not a POP3 command keyword: {keyword!r}")
    if any(bad in arg for arg in args for bad in ("\r", "\n", "\0")):
        raise LocalProtocolError(f"an argument of {keyword} contains CR, LF or NUL")
    line = " ".join((keyword, *args)).encode("utf-8") + _CRLF
    if len(line) > MAX_COMMAND_OCTETS:
        raise LocalProtocolError(
            f"{keyword} would be {len(line)} octets, over the {MAX_COMMAND_OCTETS}-octet limit (RFC 2449)"
        )
    return line


# --- Events --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete status reply. `body` is set only for a positive multi-line reply."""

    keyword: str  # the command it answers ("GREETING" for the banner)
    ok: bool
    text: str  # the status line after `+OK ` / `-ERR `, response code included
    body: bytes | None = None

    @property
    def code(self) -> str | None:
        return response_code(self.text)


@dataclass(frozen=True, slots=True)
class Challenge:
    """A SASL continuation (`+ base64`); `data` is the base64 text, possibly empty."""

    keyword: str
    data: bytes


Event = Reply | Challenge


def response_code(text: str) -> str | None:
    """The RFC 2449 response code at the start of a status text: `[IN-USE] x` -> `IN-USE`."""
    match = re.match(r"\[([^\[\]\s]+)\]", text)
    return match.group(1).upper() if match else None


# --- The state machine ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Expected:
    keyword: str
    shape: Shape
    ends_plaintext: bool = False  # STLS: nothing may follow its reply before the TLS handshake
    cap: int = MAX_STATUS_LINE_OCTETS  # bytes of a multi-line body


def reply_cap(keyword: str, max_message_bytes: int) -> int:
    """The byte cap of a multi-line reply to `keyword`: a message for RETR and TOP, fixed otherwise."""
    fixed = {"CAPA": MAX_CAPA_BYTES, "UIDL": MAX_UIDL_BYTES, "LIST": MAX_LIST_BYTES}
    return fixed.get(keyword, max_message_bytes)


class Pop3Connection:
    """Client side of one POP3 session, without I/O. Starts out expecting the server greeting.

    `max_message_bytes` caps the reply to RETR and TOP (the other caps are fixed, see `reply_cap`);
    a reply over its cap raises ReplyTooLargeError as soon as the bytes received show it.
    """

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._expected: deque[_Expected] = deque([_Expected("GREETING", Shape.SINGLE)])
        self._buffer = bytearray()  # received, not yet scanned into a reply
        self._scan = 0  # where the next search for CRLF or the terminator resumes
        self._in_body = False
        self._body = bytearray()  # the multi-line body so far, dot-stuffing removed
        self._skip = 0  # octets at the buffer's front that precede the body (its status line's CRLF)
        self._status = ""
        self._awaiting_tls = False
        self._broken = False
        self._max_message_bytes = max_message_bytes

    @property
    def pending(self) -> int:
        """How many replies are still expected."""
        return len(self._expected)

    @property
    def awaiting(self) -> str | None:
        """The command whose reply comes next ("GREETING" for the banner), if any."""
        return self._expected[0].keyword if self._expected else None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned reply."""
        return len(self._buffer)

    def send(self, cmd: Command) -> bytes:
        """Record that `cmd` is being sent; return its bytes."""
        self._check_can_send()
        cap = reply_cap(cmd.keyword, self._max_message_bytes)
        self._expected.append(_Expected(cmd.keyword, cmd.shape, cmd.keyword == "STLS", cap))
        return cmd.line

    def send_many(self, cmds: Iterable[Command]) -> bytes:
        """Pipeline several commands: one buffer to write in one call."""
        return b"".join([self.send(c) for c in cmds])

    def send_sasl_response(self, response: bytes) -> bytes:
        """Answer a Challenge with a base64 line (b"" for an empty line, b"*" to cancel).

        A client response is not a command, so the 255-octet limit does not apply (RFC 5034 section 4).
        """
        self._check_can_send()
        if _CRLF[:1] in response or _CRLF[1:] in response:
            raise LocalProtocolError("a SASL response must not contain CR or LF")
        self._expected.append(_Expected("AUTH", Shape.SASL))
        return response + _CRLF

    def tls_established(self) -> None:
        """The adapter finished the TLS handshake after a positive STLS reply."""
        self._awaiting_tls = False

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed received bytes; return the replies they complete, oldest first."""
        if self._broken:
            raise RemoteProtocolError("the connection already failed")
        try:
            return self._receive(data)
        except RemoteProtocolError:
            self._broken = True
            raise

    def _check_can_send(self) -> None:
        if self._broken:
            raise LocalProtocolError("the connection already failed")
        if self._awaiting_tls or any(e.ends_plaintext for e in self._expected):
            raise LocalProtocolError("no command may follow STLS before the TLS handshake")

    def _receive(self, data: bytes) -> list[Event]:
        if data and self._awaiting_tls:
            raise RemoteProtocolError("the server sent data between its STLS reply and the TLS handshake")
        self._buffer += data
        events: list[Event] = []
        while self._expected:
            event = self._next_event()
            if event is None:
                break
            events.append(event)
            self._after(event)
        if self._buffer and not self._expected:
            raise RemoteProtocolError(f"unexpected data from the server: {bytes(self._buffer[:60])!r}")
        return events

    def _after(self, event: Event) -> None:
        expected = self._expected.popleft()
        if expected.ends_plaintext and isinstance(event, Reply) and event.ok:
            if self._buffer:
                raise RemoteProtocolError("the server sent data after its STLS reply")
            self._awaiting_tls = True

    def _next_event(self) -> Event | None:
        if not self._in_body:
            return self._status_event()
        return self._body_event()

    def _status_event(self) -> Event | None:
        end = self._buffer.find(_CRLF, self._scan)
        if end < 0:
            if len(self._buffer) > MAX_STATUS_LINE_OCTETS:
                self._buffer = bytearray()
                raise ReplyTooLargeError(self._expected[0].keyword, MAX_STATUS_LINE_OCTETS)
            self._scan = max(0, len(self._buffer) - 1)
            return None
        line = bytes(self._buffer[:end])
        expected = self._expected[0]
        if expected.shape is Shape.MULTI and line.startswith(b"+OK"):
            self._status = _status_text(line, 3)
            self._in_body = True
            self._consume(end)  # keep the CRLF: an empty body's terminator or a first dot line starts there
            self._skip = 2
            return self._body_event()
        self._consume(end + 2)
        return _single_line_event(line, expected)

    def _body_event(self) -> Reply | None:
        """Scan for line starts with a dot: each is either the terminator or a stuffed dot to drop.

        One bytes.find pass over the body (C speed); Python runs once per dot line, not per byte. What
        is scanned moves into `_body` without its stuffing dot, so memory is the body once, whatever
        the number of dot lines.
        """
        while (hit := self._buffer.find(b"\r\n.", self._scan)) >= 0:
            if len(self._buffer) < hit + len(_TERMINATOR):
                self._scan = hit  # the two octets after the dot decide; wait for them
                return None
            if self._buffer[hit + 3 : hit + 5] == _CRLF:
                return self._finish_body(hit)
            self._take_body(hit + 2, drop=1)  # the line keeps its CRLF and loses the stuffed dot
            self._check_reply_size(0)
        self._check_reply_size(len(self._buffer) - self._skip)  # no terminator in it: all body
        self._scan = max(0, len(self._buffer) - 2)
        return None

    def _take_body(self, end: int, *, drop: int) -> None:
        """Move buffer[skip:end] to the body and forget `drop` more octets."""
        with memoryview(self._buffer) as view:
            self._body += view[self._skip : end]
        del self._buffer[: end + drop]  # O(1) at the front of a bytearray in CPython
        self._skip = 0
        self._scan = 0

    def _finish_body(self, terminator: int) -> Reply:
        self._take_body(terminator + 2, drop=len(_TERMINATOR) - 2)
        body = bytes(self._body)
        self._body = bytearray()
        self._in_body = False
        return Reply(self._expected[0].keyword, True, self._status, body)

    def _check_reply_size(self, pending: int) -> None:
        """The body so far, with `pending` octets of it still in the buffer (stuffed), against its cap."""
        cap = self._expected[0].cap
        if len(self._body) + pending > cap + len(_TERMINATOR):
            self._body = bytearray()
            self._buffer = bytearray()  # the connection is unusable now: keep nothing of the reply
            raise ReplyTooLargeError(self._expected[0].keyword, cap)

    def _consume(self, n: int) -> None:
        del self._buffer[:n]  # O(1) at the front of a bytearray in CPython
        self._scan = 0


def _status_text(line: bytes, prefix: int) -> str:
    return line[prefix:].lstrip(b" ").decode("utf-8", "replace")


def _single_line_event(line: bytes, expected: _Expected) -> Event:
    if line.startswith(b"+OK"):
        return Reply(expected.keyword, True, _status_text(line, 3))
    if line.startswith(b"-ERR"):
        return Reply(expected.keyword, False, _status_text(line, 4))
    if expected.shape is Shape.SASL and (line == b"+" or line.startswith(b"+ ")):
        return Challenge(expected.keyword, line[2:].strip())
    raise RemoteProtocolError(f"reply to {expected.keyword} is not +OK or -ERR: {line[:60]!r}")


# --- Reading replies -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The CAPA reply (RFC 2449 section 6, RFC 2595, RFC 3206, RFC 6856). Empty when CAPA failed."""

    pipelining: bool = False
    uidl: bool = False
    top: bool = False
    user: bool = False
    sasl: frozenset[str] = frozenset()
    resp_codes: bool = False
    auth_resp_code: bool = False
    login_delay: int | None = None  # seconds between logins
    expire: int | Literal["NEVER"] | None = None  # days retrieved mail stays; 0: leave-on-server refused
    stls: bool = False
    implementation: str | None = None
    utf8: bool = False
    lines: tuple[str, ...] = ()


def parse_capabilities(body: bytes) -> Capabilities:
    """Parse the lines of a positive CAPA reply; unknown capabilities are kept only in `lines`."""
    lines = tuple(_lines(body))
    found: dict[str, list[str]] = {}
    for line in lines:
        name, *args = line.split()
        found[name.upper()] = args
    return Capabilities(
        pipelining="PIPELINING" in found,
        uidl="UIDL" in found,
        top="TOP" in found,
        user="USER" in found,
        sasl=frozenset(a.upper() for a in found.get("SASL", ())),
        resp_codes="RESP-CODES" in found,
        auth_resp_code="AUTH-RESP-CODE" in found,
        login_delay=_int_argument(found.get("LOGIN-DELAY")),
        expire=_expire(found.get("EXPIRE")),
        stls="STLS" in found,
        implementation=_implementation(lines),
        utf8="UTF8" in found,
        lines=lines,
    )


def _lines(body: bytes) -> list[str]:
    text = body.decode("utf-8", "replace")  # bytes that are not UTF-8 only ever make an id invalid
    return [line for line in text.split("\r\n") if line.strip()]


def _int_argument(args: list[str] | None) -> int | None:
    return int(args[0]) if args and args[0].isdigit() else None


def _expire(args: list[str] | None) -> int | Literal["NEVER"] | None:
    if args and args[0].upper() == "NEVER":
        return "NEVER"
    return _int_argument(args)


def _implementation(lines: tuple[str, ...]) -> str | None:
    for line in lines:
        name, _, rest = line.partition(" ")
        if name.upper() == "IMPLEMENTATION":
            return rest.strip() or None
    return None


def parse_uidl(body: bytes) -> dict[int, str]:
    """The multi-line UIDL reply: `msg-number unique-id` per line (RFC 1939 section 7).

    The unique-id is everything after the number and its space, as sent (so an id with a space is
    not cut short into another message's id); a number listed twice, or without an id, maps to "".
    Whether an id can identify its message is `valid_unique_id`'s call, not this parser's.
    """
    uidls: dict[int, str] = {}
    for line in _lines(body):
        number_text, _, unique_id = line.strip(" ").partition(" ")
        number = _number(number_text, "UIDL")
        uidls[number] = "" if number in uidls else unique_id.lstrip(" ")
    return uidls


def valid_unique_id(unique_id: str) -> bool:
    """RFC 1939 section 7: 1 to 70 characters, each in 0x21..0x7E."""
    return _UNIQUE_ID.fullmatch(unique_id) is not None


def parse_list(body: bytes) -> dict[int, int]:
    """The multi-line LIST reply: `msg-number octets` per line (RFC 1939 section 5)."""
    listing = (_listing(line, "LIST") for line in _lines(body))
    return {number: _number(size, "LIST") for number, size in listing}


def parse_stat(text: str) -> tuple[int, int]:
    """The STAT reply text `count octets` -> (count, octets)."""
    count, size = _listing(text, "STAT")
    return count, _number(size, "STAT")


def _listing(line: str, keyword: str) -> tuple[int, str]:
    fields = line.split()
    if len(fields) < 2:
        raise RemoteProtocolError(f"malformed {keyword} line: {line[:60]!r}")
    return _number(fields[0], keyword), fields[1]


def _number(text: str, keyword: str) -> int:
    if not (text.isascii() and text.isdigit()):  # str.isdigit alone takes "²", which int() refuses
        raise RemoteProtocolError(f"malformed number in a {keyword} reply: {text[:20]!r}")
    return int(text)


# --- What an -ERR means for the caller -----------------------------------------------------------


class Recovery(Enum):
    """What a caller should do after an -ERR, from its response code (RFC 2449, RFC 3206)."""

    RETRY_LATER = "retry-later"  # [IN-USE], [LOGIN-DELAY]: back off, then try again
    TRANSIENT = "transient"  # [SYS/TEMP]: a passing server problem
    NEEDS_ADMIN = "needs-admin"  # [SYS/PERM]: will not fix itself
    CREDENTIALS = "credentials"  # [AUTH]: the credentials are wrong
    UNKNOWN = "unknown"  # no code, or one we do not know


_RECOVERY_BY_CODE: Final = {
    ("IN-USE",): Recovery.RETRY_LATER,
    ("LOGIN-DELAY",): Recovery.RETRY_LATER,
    ("SYS", "TEMP"): Recovery.TRANSIENT,
    ("SYS", "PERM"): Recovery.NEEDS_ADMIN,
    ("AUTH",): Recovery.CREDENTIALS,
}


def classify_response_code(code: str | None) -> Recovery:
    """Classify a response code; codes are hierarchical, so `SYS/TEMP/DISK` is still `SYS/TEMP`."""
    if not code:
        return Recovery.UNKNOWN
    levels = tuple(code.upper().split("/"))
    for depth in (2, 1):
        if (recovery := _RECOVERY_BY_CODE.get(levels[:depth])) is not None:
            return recovery
    return Recovery.UNKNOWN


# --- Authentication messages ---------------------------------------------------------------------


def greeting_timestamp(greeting: str) -> str | None:
    """The APOP timestamp `<...@...>` in the server greeting (RFC 1939 section 7), if any."""
    match = re.search(r"<[^<>\s]*@[^<>\s]*>", greeting)
    return match.group(0) if match else None


def apop_digest(timestamp: str, secret: str) -> str:
    """MD5 over the greeting timestamp (angle brackets included) followed by the shared secret."""
    data = (timestamp + secret).encode("utf-8")
    return hashlib.md5(data, usedforsecurity=False).hexdigest()  # APOP is defined on MD5


def sasl_plain(username: str, password: str, authzid: str = "") -> bytes:
    """The base64 PLAIN message `authzid NUL authcid NUL passwd` (RFC 4616)."""
    return base64.b64encode(f"{authzid}\0{username}\0{password}".encode())


def sasl_xoauth2(username: str, token: str) -> bytes:
    """The base64 XOAUTH2 message `user=<u>^Aauth=Bearer <token>^A^A` (Google, Microsoft)."""
    return base64.b64encode(f"user={username}\x01auth=Bearer {token}\x01\x01".encode())


def sasl_start(mechanism: str, initial: bytes | None, *, inline: bool = True) -> tuple[Command, bytes | None]:
    """The AUTH command, and the response still to send on the first challenge (None: nothing left).

    The initial response goes on the AUTH line only when `inline` and the line stays within 255
    octets (RFC 5034 section 4); an empty one is sent as `=`. Otherwise it waits for the `+`.
    """
    if initial is None:
        return command("AUTH", mechanism), None
    argument = initial.decode("ascii") or "="
    fits = len(f"AUTH {mechanism} {argument}\r\n") <= MAX_COMMAND_OCTETS
    if inline and fits:
        return command("AUTH", mechanism, argument), None
    return command("AUTH", mechanism), initial
