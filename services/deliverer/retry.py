"""What follows an attempt: the events to publish, the next retry and when copies give up (pure).

Deferred recipients wait in retry tiers: by default 1 min, 5 min, 30 min, 2 h, then every 6 h, each
tier its own topic. They are retried until `max_age` after `age_from` (the routing time), and the
last try is made at that instant; a recipient still deferred then fails and becomes a dead letter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import msgspec

from schemas.events import (
    DeliveryAttempted,
    DeliveryDeadLettered,
    Recipient,
    RecipientDelivered,
    RecipientsResolved,
    RetryScheduled,
)
from services.deliverer.outcome import Verdict

DEFAULT_DELAYS = (60.0, 300.0, 1800.0, 7200.0, 21600.0)
# Why a copy became a dead letter (DeliveryDeadLettered.reason).
REJECTED = "rejected by the server"
UNSENDABLE = "cannot be sent to this server"
EXPIRED = "still deferred at the maximum age"


@dataclass(frozen=True)
class RetryPolicy:
    """The delay of each retry tier (seconds; the last repeats) and the age at which a copy gives up."""

    delays: tuple[float, ...] = DEFAULT_DELAYS
    max_age: timedelta = timedelta(days=5)

    def tier(self, attempts: int) -> int:
        """The tier (0-based) that waits after the `attempts`-th attempt."""
        return min(max(attempts, 1), len(self.delays)) - 1

    def due(self, attempts: int, now: datetime, age_from: datetime) -> datetime | None:
        """When to try again after `attempts` attempts, or None once the maximum age is reached."""
        deadline = age_from + self.max_age
        if now >= deadline:
            return None
        return min(now + timedelta(seconds=self.delays[self.tier(attempts)]), deadline)


@dataclass(frozen=True)
class Job:
    """Copies of one routed message still to deliver: to whom, after how many attempts, aged from when."""

    routed: RecipientsResolved
    recipients: tuple[str, ...]
    attempts: int
    age_from: datetime

    @classmethod
    def first(cls, routed: RecipientsResolved) -> Job:
        addresses = tuple(dict.fromkeys(r.address for r in routed.recipients))
        return cls(routed=routed, recipients=addresses, attempts=0, age_from=routed.routed_at)

    @classmethod
    def again(cls, retry: RetryScheduled) -> Job:
        return cls(routed=retry.routed, recipients=retry.recipients, attempts=retry.attempts,
                   age_from=retry.age_from)


@dataclass(frozen=True)
class Followups:
    """Everything one attempt leads to; `retry_tier` is the tier `retry` goes to."""

    attempted: list[DeliveryAttempted] = field(default_factory=list)
    delivered: list[RecipientDelivered] = field(default_factory=list)
    dead: list[DeliveryDeadLettered] = field(default_factory=list)
    retry: RetryScheduled | None = None
    retry_tier: int = 0


def followups(job: Job, verdicts: Mapping[str, Verdict], *, now: datetime, policy: RetryPolicy,
              server: str) -> Followups:
    """The events that record an attempt at `job`'s recipients with these verdicts."""
    attempt = job.attempts + 1
    next_due = policy.due(attempt, now, job.age_from)
    result = Followups()
    waiting: list[str] = []
    narrow = _Narrowing(job.routed)
    for recipient in job.recipients:
        verdict = verdicts[recipient]
        expired = verdict.outcome == "deferred" and next_due is None
        if expired:
            verdict = _expired(verdict, attempt, policy)
        result.attempted.append(_attempted(job, recipient, verdict, attempt=attempt, now=now, server=server))
        if verdict.outcome == "delivered":
            result.delivered.append(RecipientDelivered(fetch_id=job.routed.fetch_id, recipient=recipient,
                                                       delivered_at=now))
        elif verdict.outcome == "failed":
            reason = EXPIRED if expired else REJECTED if verdict.smtp_code is not None else UNSENDABLE
            result.dead.append(_dead(job, recipient, verdict, reason=reason, attempt=attempt, now=now,
                                     server=server, routed=narrow.to(recipient)))
        else:
            waiting.append(recipient)
    if not waiting or next_due is None:
        return result
    retry = RetryScheduled(routed=job.routed, recipients=tuple(waiting), attempts=attempt, due_at=next_due,
                           age_from=job.age_from, last_reply=verdicts[waiting[0]].text)
    return Followups(result.attempted, result.delivered, result.dead, retry, policy.tier(attempt))


class _Narrowing:
    """The routed event cut down to one of its recipients, so that a dead letter holds that recipient only:
    N dead letters carry N recipients in all, not N times N (ROUTING.md section 6). One retry event per
    attempt keeps them all: that is linear already."""

    def __init__(self, routed: RecipientsResolved) -> None:
        self.routed = routed
        self._by_address = {recipient.address: recipient for recipient in routed.recipients}

    def to(self, address: str) -> RecipientsResolved:
        kept: tuple[Recipient, ...] = (self._by_address[address],) if address in self._by_address else ()
        return msgspec.structs.replace(self.routed, recipients=kept, suppressed=())


def _expired(verdict: Verdict, attempts: int, policy: RetryPolicy) -> Verdict:
    days = policy.max_age / timedelta(days=1)
    text = f"deferred for {days:g} days, gave up after {attempts} attempts; last reply: {verdict.text}"
    return Verdict("failed", verdict.smtp_code, verdict.enhanced_code, text)


def _attempted(job: Job, recipient: str, verdict: Verdict, *, attempt: int, now: datetime,
               server: str) -> DeliveryAttempted:
    return DeliveryAttempted(fetch_id=job.routed.fetch_id, recipient=recipient, outcome=verdict.outcome,
                             smtp_code=verdict.smtp_code, enhanced_code=verdict.enhanced_code,
                             smtp_text=verdict.text, attempt=attempt, attempted_at=now, server=server)


def _dead(job: Job, recipient: str, verdict: Verdict, *, reason: str, attempt: int, now: datetime,
          server: str, routed: RecipientsResolved) -> DeliveryDeadLettered:
    return DeliveryDeadLettered(routed=routed, recipient=recipient, reason=reason,
                                smtp_code=verdict.smtp_code, enhanced_code=verdict.enhanced_code,
                                smtp_text=verdict.text, attempts=attempt, dead_lettered_at=now, server=server,
                                routed_recipients=len(job.routed.recipients))
