"""The envelope one copy goes out with, decided from the server's EHLO/LHLO extensions (pure).

- SIZE: the size is declared, and a message over the server's limit fails here (5.3.4) unsent.
- 8BITMIME: `BODY=8BITMIME` when the message has 8-bit bytes and the server offers it; without the
  extension the bytes still go out as they are (converting them would change the message).
- SMTPUTF8 (RFC 6531): needed for a non-ASCII address or 8-bit header fields. Towards a server without
  it, a non-ASCII recipient fails on its own (5.6.7) and a non-ASCII sender or header fails every
  recipient (5.6.7 / 5.6.9): a clear permanent failure, never a crash.
- DSN (RFC 3461): when the server offers DSN, each RCPT carries `NOTIFY=FAILURE,DELAY` (what RFC 3461 lets
  a server assume anyway without NOTIFY, now explicit; never SUCCESS) and, for an ASCII address,
  `ORCPT=rfc822;<address>`. Towards the null sender no DSN is ever sent.
- A sender that cannot be written in MAIL FROM (spaces, brackets, control characters) becomes the null
  sender `<>`: the copy still arrives, and nobody outside is ever sent a bounce.
- A recipient whose local part the server could read as a route elsewhere (`%`, `!`, quotes, ...; see
  services.runtime.local_parts) is never written in RCPT TO: it fails here (5.1.3) and becomes a dead
  letter. The router never produces one; this holds for events written before it learned that.
- At most `max_recipients` RCPTs per transaction: `transactions` splits the envelope.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from services.deliverer.outcome import Verdict, refused_here
from services.runtime.local_parts import is_safe_local_part

DSN_NOTIFY = "NOTIFY=FAILURE,DELAY"
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r")
_UNSAFE_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")


@dataclass(frozen=True)
class Extensions:
    """The service extensions a server announced, by lower-case keyword, with their parameters."""

    offered: Mapping[str, str] = field(default_factory=dict)

    def has(self, keyword: str) -> bool:
        return keyword.lower() in self.offered

    @property
    def size_limit(self) -> int | None:
        value = self.offered.get("size", "").strip()
        return int(value) if value.isdigit() and int(value) > 0 else None


@dataclass(frozen=True)
class Envelope:
    """MAIL FROM and RCPT TO of one transaction, with parameters, and the recipients refused before it."""

    sender: str
    mail_params: tuple[str, ...]
    recipients: tuple[str, ...]
    rcpt_params: Mapping[str, tuple[str, ...]]
    refused: Mapping[str, Verdict]


def with_crlf(message: bytes) -> bytes:
    """The message with CRLF line endings (as SMTP carries it), ending in CRLF; unchanged when it has them."""
    lines = message
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:  # a bare LF or CR: the rare slow path
        lines = _LINE_ENDINGS.sub(b"\r\n", message)
    return lines if lines.endswith(b"\r\n") else lines + b"\r\n"


def wire_data(message: bytes) -> bytes:
    """The message as it travels after DATA: CRLF line endings, leading dots doubled, then `.` CRLF."""
    lines = with_crlf(message)
    if lines.startswith(b"."):
        lines = b"." + lines
    return lines.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def mail_from(envelope_sender: str | None) -> str:
    """The reverse path: the envelope sender, or "" (the null sender) when there is none or it is unusable."""
    sender = (envelope_sender or "").strip()
    if not sender or _UNSAFE_ADDRESS.search(sender) or "@" not in sender:
        return ""
    return sender


def header_section(message: bytes) -> bytes:
    """The header fields of a message: everything before the first empty line."""
    match = re.search(rb"\r?\n\r?\n", message)
    return message if match is None else message[: match.start()]


def plan(sender: str, recipients: Sequence[str], message: bytes, extensions: Extensions) -> Envelope:
    """The envelope for `message` (the bytes as they will be sent, before dot-stuffing)."""
    unsafe = {r: refused_here("5.1.3", "recipient address cannot be written in RCPT TO")
              for r in recipients if _UNSAFE_ADDRESS.search(r) or not r.isprintable()}
    unsafe.update({r: refused_here("5.1.3", "recipient local part could be read as a route to another "
                                            "domain; not sent (ROUTING.md section 6)")
                   for r in recipients if r not in unsafe and not _safe_local(r)})
    refused: dict[str, Verdict] = dict(unsafe)
    utf8 = extensions.has("smtputf8")
    if not utf8:
        refused.update(_needs_smtputf8(sender, [r for r in recipients if r not in unsafe], message))
    size = len(with_crlf(message))
    if extensions.size_limit is not None and size > extensions.size_limit:
        too_big = refused_here("5.3.4", f"message of {size} bytes exceeds the server's limit of "
                                        f"{extensions.size_limit} bytes")
        refused.update({r: too_big for r in recipients if r not in refused})
    sending = tuple(r for r in recipients if r not in refused)
    return Envelope(sender, _mail_params(sender, sending, message, size, extensions), sending,
                    {r: _rcpt_params(r, extensions) for r in sending}, refused)


def _safe_local(recipient: str) -> bool:
    return is_safe_local_part(recipient.rpartition("@")[0], utf8=True)


def transactions(envelope: Envelope, max_recipients: int) -> list[Envelope]:
    """The envelope as consecutive transactions of at most `max_recipients` RCPTs each, in order."""
    recipients = envelope.recipients
    return [
        replace(envelope, recipients=recipients[start : start + max_recipients],
                rcpt_params={r: envelope.rcpt_params[r] for r in recipients[start : start + max_recipients]},
                refused={})
        for start in range(0, len(recipients), max_recipients)
    ]


def _needs_smtputf8(sender: str, recipients: Sequence[str], message: bytes) -> dict[str, Verdict]:
    if not sender.isascii():
        return dict.fromkeys(recipients, refused_here(
            "5.6.7", "the sender address needs SMTPUTF8, which the server does not offer"))
    if not header_section(message).isascii():
        return dict.fromkeys(recipients, refused_here(
            "5.6.9", "the message has non-ASCII header fields that need SMTPUTF8, "
                     "which the server does not offer"))
    return {r: refused_here("5.6.7", "the recipient address needs SMTPUTF8, which the server does not offer")
            for r in recipients if not r.isascii()}


def _mail_params(sender: str, recipients: Sequence[str], message: bytes, size: int,
                 extensions: Extensions) -> tuple[str, ...]:
    params: list[str] = []
    if extensions.has("size"):
        params.append(f"SIZE={size}")
    if extensions.has("8bitmime") and not message.isascii():
        params.append("BODY=8BITMIME")
    needs_utf8 = not (sender.isascii() and all(r.isascii() for r in recipients)
                      and header_section(message).isascii())
    if extensions.has("smtputf8") and needs_utf8:
        params.append("SMTPUTF8")
    return tuple(params)


def _rcpt_params(recipient: str, extensions: Extensions) -> tuple[str, ...]:
    if not extensions.has("dsn"):
        return ()
    if not recipient.isascii():  # ORCPT's rfc822 type is ASCII only (RFC 6533's utf-8 type is not used)
        return (DSN_NOTIFY,)
    return (DSN_NOTIFY, f"ORCPT=rfc822;{xtext(recipient)}")


def xtext(value: str) -> str:
    """RFC 3461 xtext: `+`, `=` and characters outside `!`..`~` become `+HH`."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in value)
