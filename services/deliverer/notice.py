"""The postmaster's notice about a dead-lettered copy (pure): a short text/plain message, never a bounce.

It goes to the organisation's postmaster only (`notify_postmaster`), with the null sender, so nothing
ever answers it; the outside sender is never told (no backscatter). The notice is not an event: when it
cannot be delivered the deliverer logs that and moves on, so a notice can never become a dead letter.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.policy import SMTP, compat32, default
from email.utils import format_datetime

from schemas.events import DeliveryDeadLettered

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # undecodable bytes of a raw header (surrogateescape)
_ORIGINAL_FIELDS = ("From", "Subject", "Date", "Message-ID")


def _clean(value: object, limit: int = 200) -> str:
    """One line of at most `limit` characters: folded whitespace and control characters become spaces."""
    text = " ".join(_CONTROL.sub(" ", _SURROGATE.sub("\ufffd", str(value))).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def postmaster_notice(dead: DeliveryDeadLettered, *, postmaster: str, now: datetime) -> bytes:
    """The notice telling `postmaster` that `dead`'s copy was given up, and how to re-drive it (CRLF)."""
    notice = EmailMessage(policy=SMTP)
    recipient = _clean(dead.recipient)
    notice["From"] = f"popbridge <{postmaster}>"
    notice["To"] = postmaster
    notice["Subject"] = f"popbridge: undeliverable copy for {recipient}"
    notice["Date"] = format_datetime(now)
    notice["Message-ID"] = _message_id(dead, postmaster)
    notice["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-reply may answer it
    notice.set_content(_body(dead, recipient), cte="quoted-printable")
    return notice.as_bytes()


def _message_id(dead: DeliveryDeadLettered, postmaster: str) -> str:
    """Stable per dead letter, so a notice sent twice (after a crash) is recognisably the same one."""
    digest = hashlib.sha256(f"{dead.routed.fetch_id}\x00{dead.recipient}\x00{dead.attempts}".encode())
    domain = postmaster.rpartition("@")[2] or "popbridge.invalid"
    return f"<dead-letter.{digest.hexdigest()[:32]}@{_clean(domain)}>"


def _original_fields(raw: bytes) -> list[tuple[str, str]]:
    """From, Subject, Date and Message-ID of the message, decoded (RFC 2047, UTF-8) where possible."""
    found = []
    for name in _ORIGINAL_FIELDS:
        try:
            value = _header(BytesHeaderParser(policy=default).parsebytes(raw), name)
        except Exception:  # a field the modern parser chokes on is shown raw instead
            value = _header(BytesHeaderParser(policy=compat32).parsebytes(raw), name)
        if value is not None:
            found.append((name, _clean(value)))
    return found


def _header(headers: Message, name: str) -> object | None:
    return headers[name]


def _body(dead: DeliveryDeadLettered, recipient: str) -> str:
    routed, letter_id = dead.routed, dead.routed.fetch_id[:12]
    reply = f"{dead.smtp_code or '-'} {_clean(dead.smtp_text, 500)}".strip()
    lines = [
        f"popbridge gave up delivering a copy to {recipient}.",
        "",
        f"Fetch id:      {routed.fetch_id}",
        f"Recipient:     {recipient}",
        f"Reason:        {_clean(dead.reason)}",
        f"Server reply:  {reply}",
        f"Server:        {_clean(dead.server) or '-'}",
        f"Attempts:      {dead.attempts}, last {dead.dead_lettered_at:%Y-%m-%d %H:%M:%S %Z}",
        f"Mailbox:       {_clean(routed.mailbox_id)} on {_clean(routed.pop3_host)}",
    ]
    lines += [f"{name + ':':15}{value}" for name, value in _original_fields(routed.raw)]
    lines += [
        "",
        "The sender was not notified. Once the cause is fixed, deliver the copy again with:",
        "",
        f"    popbridge dlq retry {letter_id} --recipient {recipient}",
        "",
        f"Details: popbridge dlq show {letter_id}",
    ]
    return "\n".join(lines) + "\n"
