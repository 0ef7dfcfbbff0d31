"""The dead letters an operator sees (pure): the latest record per copy, whether a retry delivered it since,
and the lines `popbridge dlq list` and `dlq show` print."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32

from schemas.events import DeliveryDeadLettered, RecipientDelivered


@dataclass(frozen=True)
class DeadLetter:
    """One dead-letter record, and whether its copy has been delivered since (by a retry)."""

    event: DeliveryDeadLettered
    delivered_since: bool

    @property
    def id(self) -> str:
        return self.event.routed.fetch_id[:12]


def latest_dead_letters(
    letters: Iterable[tuple[int, DeliveryDeadLettered]], delivered: Iterable[RecipientDelivered]
) -> list[DeadLetter]:
    """The latest dead letter per (fetch id, recipient), given with its record timestamp (ms), oldest
    first; `delivered` is the delivery ledger, which says whether a retry delivered the copy since."""
    done = {(d.fetch_id, d.recipient) for d in delivered}
    latest: dict[tuple[str, str], DeliveryDeadLettered] = {}
    for _, event in sorted(letters, key=lambda pair: pair[0]):
        latest[(event.routed.fetch_id, event.recipient)] = event
    return [DeadLetter(event, key in done) for key, event in latest.items()]


def matching(letters: Iterable[DeadLetter], letter_id: str, recipient: str | None) -> list[DeadLetter]:
    """The dead letters whose fetch id starts with `letter_id` (and for `recipient`, when given)."""
    return [d for d in letters if d.event.routed.fetch_id.startswith(letter_id)
            and (recipient is None or d.event.recipient == recipient)]


def summary(letter: DeadLetter) -> str:
    """The one line `dlq list` prints."""
    event = letter.event
    status = "delivered" if letter.delivered_since else "open"
    reply = event.smtp_text.splitlines()[0] if event.smtp_text else ""
    return (f"{letter.id}  {event.dead_lettered_at:%Y-%m-%d %H:%M}  {status:9}  {event.recipient}  "
            f"{event.smtp_code or '-'} {reply}")


def describe(letter: DeadLetter) -> str:
    """The multi-line description `dlq show` prints."""
    event, routed = letter.event, letter.event.routed
    headers = BytesHeaderParser(policy=compat32).parsebytes(routed.raw)
    lines = [
        f"id:            {letter.id}  (fetch id {routed.fetch_id})",
        f"recipient:     {event.recipient}",
        f"status:        {'delivered since' if letter.delivered_since else 'open'}",
        f"reason:        {event.reason}",
        f"server reply:  {event.smtp_code or '-'} {event.smtp_text}",
        f"server:        {event.server}",
        f"attempts:      {event.attempts}, last {event.dead_lettered_at:%Y-%m-%d %H:%M:%S %Z}",
        f"mailbox:       {routed.mailbox_id} on {routed.pop3_host}",
        f"envelope from: <{routed.envelope_sender or ''}>",
        f"size:          {len(routed.raw)} bytes",
    ]
    lines += [f"{name + ':':15}{headers[name]}" for name in ("From", "Subject", "Date", "Message-ID")
              if headers[name] is not None]
    return "\n".join(lines) + "\n"
