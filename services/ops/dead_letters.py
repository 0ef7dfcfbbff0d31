"""The dead letters an operator sees (pure): the latest record per copy, whether a retry delivered it since,
the filters of `dlq list`, the plan of `dlq retry`, and what `dlq list`, `show` and `retry` print (text
and `--json`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

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


def listed(
    letters: Iterable[DeadLetter], *, show_all: bool = False, recipient: str | None = None,
    mailbox: str | None = None,
) -> list[DeadLetter]:
    """The dead letters `dlq list` shows: open ones (all with `show_all`), for `recipient` (case-insensitive)
    and from `mailbox` when given."""
    return [d for d in letters
            if (show_all or not d.delivered_since)
            and (recipient is None or d.event.recipient.lower() == recipient.lower())
            and (mailbox is None or d.event.routed.mailbox_id == mailbox)]


# --- JSON ------------------------------------------------------------------------------------------


def letter_json(letter: DeadLetter) -> dict[str, Any]:
    """One dead letter for scripts (message bytes left out): {"id", "fetch_id", "status" ("open" or
    "delivered"), "recipient", "reason", "smtp_code", "enhanced_code", "smtp_text", "server", "attempts",
    "dead_lettered_at" (ISO 8601), "mailbox_id", "pop3_host", "message_id"}."""
    event, routed = letter.event, letter.event.routed
    return {
        "id": letter.id, "fetch_id": routed.fetch_id,
        "status": "delivered" if letter.delivered_since else "open",
        "recipient": event.recipient, "reason": event.reason, "smtp_code": event.smtp_code,
        "enhanced_code": event.enhanced_code, "smtp_text": event.smtp_text, "server": event.server,
        "attempts": event.attempts, "dead_lettered_at": event.dead_lettered_at.isoformat(),
        "mailbox_id": routed.mailbox_id, "pop3_host": routed.pop3_host, "message_id": routed.message_id,
    }


def list_json(letters: Iterable[DeadLetter], since: datetime | None) -> dict[str, Any]:
    """`dlq list --json`: {"since": ISO 8601 or null (the window read), "dead_letters": [letter_json]}."""
    return {"since": since.isoformat() if since else None, "dead_letters": [letter_json(d) for d in letters]}


# --- retry -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPlan:
    """What `dlq retry` would do: the copies it re-queues, and those it leaves (delivered since)."""

    requeue: tuple[DeadLetter, ...]
    delivered: tuple[DeadLetter, ...]


def plan_retry(
    letters: Iterable[DeadLetter], letter_id: str | None, recipient: str | None = None
) -> RetryPlan:
    """The dead letters named by `letter_id` (a fetch id prefix; None: all) and `recipient`, split into the
    open ones (to re-queue) and those a retry delivered since (left alone)."""
    chosen = (list(letters) if letter_id is None and recipient is None
              else matching(letters, letter_id or "", recipient))
    return RetryPlan(tuple(d for d in chosen if not d.delivered_since),
                     tuple(d for d in chosen if d.delivered_since))


def retry_text(plan: RetryPlan, *, executed: bool) -> list[str]:
    """The lines `dlq retry` prints: each copy and what happens to it, then the count."""
    verb = "queued for retry" if executed else "would be queued for retry"
    lines = [f"{summary(d)}" for d in plan.requeue]
    lines += [f"{summary(d)}  (left alone: delivered since)" for d in plan.delivered]
    dry = "" if executed else " (dry run: nothing changed)"
    lines.append(f"dlq: {len(plan.requeue)} copies {verb}{dry}")
    return lines


def retry_json(plan: RetryPlan, *, executed: bool) -> dict[str, Any]:
    """`dlq retry --json`: {"executed": bool, "requeue": [letter_json], "delivered_since": [letter_json]}."""
    return {"executed": executed, "requeue": [letter_json(d) for d in plan.requeue],
            "delivered_since": [letter_json(d) for d in plan.delivered]}
