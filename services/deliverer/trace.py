"""The one trace field the deliverer adds to a message: a `Received:` line (RFC 5321 section 4.4), pure.

    Received: from pop.isp.example by popbridge with POP3 id <3f2a...>
     for <alice@example.com>; Tue, 01 Dec 2026 10:00:00 +0000

It names the POP3 server the message came from, popbridge, the fetch id and, for a copy to a single
recipient, that recipient; it ends with the date and time of the attempt. It is folded at 78 columns
and uses the message's own line ending. Everything after it is the message byte for byte.
"""

from __future__ import annotations

import re
from datetime import datetime
from email.utils import format_datetime

_LINE_LIMIT = 78
_NOT_ATOM = re.compile(r"[^\x21-\x7e]")


def received_field(
    *,
    pop3_host: str,
    fetch_id: str,
    at: datetime,
    recipient: str | None = None,
    by: str = "popbridge",
    line_ending: bytes = b"\r\n",
) -> bytes:
    """The `Received:` field, folded, with its line ending; `at` must be timezone-aware."""
    if at.tzinfo is None:
        raise ValueError("the Received date needs a timezone")
    clauses = ["Received:", f"from {_token(pop3_host)}", f"by {_token(by)}", "with POP3"]
    clauses.append(f"id <{_token(fetch_id)}>")
    if recipient is not None:
        clauses.append(f"for <{_token(recipient)}>")
    clauses[-1] += ";"
    clauses.append(format_datetime(at))
    return _fold(clauses, line_ending.decode("ascii")).encode("utf-8")


def line_ending_of(message: bytes) -> bytes:
    """The line ending the message uses (CRLF unless its first line ends in a bare LF)."""
    end = message.find(b"\n")
    return b"\n" if end > 0 and message[end - 1 : end] != b"\r" else b"\r\n"


def with_trace(message: bytes, field: bytes) -> bytes:
    """The message with `field` prepended; the message itself is not changed."""
    return field + message


def _token(value: str) -> str:
    """A value as one token of the field: white space and control characters cannot split or end it."""
    return _NOT_ATOM.sub("_", value) if value.isascii() else re.sub(r"[\s\x00-\x1f\x7f]", "_", value)


def _fold(clauses: list[str], line_ending: str) -> str:
    """Join the clauses with spaces, folding between two clauses where a line would pass 78 columns."""
    lines: list[str] = []
    current = clauses[0]
    for clause in clauses[1:]:
        if len(current) + 1 + len(clause) > _LINE_LIMIT:
            lines.append(current)
            current = " " + clause
        else:
            current += " " + clause
    lines.append(current)
    return line_ending.join(lines) + line_ending
