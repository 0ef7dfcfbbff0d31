"""services/deliverer/retry.py: the retry schedule and what an attempt leads to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from schemas.codec import encode
from schemas.events import DeliveryDeadLettered, Evidence, Recipient, RecipientsResolved
from services.deliverer.outcome import Verdict
from services.deliverer.retry import EXPIRED, REJECTED, Job, RetryPolicy, followups

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
ROUTED = RecipientsResolved(
    fetch_id="f1",
    mailbox_id="m",
    pop3_host="pop.isp.example",
    message_id=None,
    envelope_sender=None,
    recipients=(
        Recipient(address="a@x", reason="r"),
        Recipient(address="b@x", reason="r"),
        Recipient(address="c@x", reason="r"),
        Recipient(address="a@x", reason="dup"),
    ),
    reason="r",
    rules_version="v",
    routed_at=T0,
    raw=b"m",
)
DELIVERED = Verdict("delivered", 250, None, "ok")
DEFERRED = Verdict("deferred", 450, "4.2.0", "busy")
FAILED = Verdict("failed", 550, "5.1.1", "unknown")


def test_the_default_schedule_is_1m_5m_30m_2h_then_every_6h() -> None:
    policy = RetryPolicy()
    delays = [(policy.due(n, T0, T0) or T0) - T0 for n in range(1, 8)]
    minutes = [d / timedelta(minutes=1) for d in delays]
    assert minutes == [1, 5, 30, 120, 360, 360, 360]


def test_the_last_try_is_at_the_maximum_age_then_none() -> None:
    policy = RetryPolicy()
    almost = T0 + timedelta(days=5) - timedelta(hours=1)
    assert policy.due(9, almost, T0) == T0 + timedelta(days=5)
    assert policy.due(10, T0 + timedelta(days=5), T0) is None


def test_first_job_has_each_recipient_once() -> None:
    assert Job.first(ROUTED).recipients == ("a@x", "b@x", "c@x")


def test_each_outcome_leads_to_its_record() -> None:
    job = Job.first(ROUTED)
    result = followups(
        job, {"a@x": DELIVERED, "b@x": DEFERRED, "c@x": FAILED}, now=T0, policy=RetryPolicy(), server="mx:25"
    )
    assert [(a.recipient, a.outcome, a.attempt) for a in result.attempted] == [
        ("a@x", "delivered", 1),
        ("b@x", "deferred", 1),
        ("c@x", "failed", 1),
    ]
    assert [d.recipient for d in result.delivered] == ["a@x"]
    assert [(d.recipient, d.reason, d.smtp_code) for d in result.dead] == [("c@x", REJECTED, 550)]
    assert result.retry is not None
    assert (result.retry.recipients, result.retry.attempts, result.retry_tier) == (("b@x",), 1, 0)
    assert result.retry.due_at == T0 + timedelta(minutes=1)


def test_a_copy_still_deferred_at_the_maximum_age_fails() -> None:
    job = Job(routed=ROUTED, recipients=("b@x",), attempts=30, age_from=T0)
    result = followups(job, {"b@x": DEFERRED}, now=T0 + timedelta(days=5), policy=RetryPolicy(), server="")
    assert result.retry is None
    assert [a.outcome for a in result.attempted] == ["failed"]
    assert [(d.reason, d.smtp_code) for d in result.dead] == [(EXPIRED, 450)]
    assert "gave up after 31 attempts" in result.dead[0].smtp_text


def storm(count: int) -> RecipientsResolved:
    """A routed message for `count` recipients, each with the evidence the router writes."""
    evidence = (Evidence(source="delivered-to", field="Delivered-To", field_index=0, value="x" * 60),)
    people = tuple(Recipient(address=f"user{n}@example.com", reason="delivered-to", evidence=evidence)
                   for n in range(count))
    return msgspec.structs.replace(ROUTED, recipients=people, raw=b"Subject: storm\r\n\r\n" + b"x" * 2000)


def dead_letter_bytes(count: int) -> tuple[int, list[DeliveryDeadLettered]]:
    routed = storm(count)
    job = Job.first(routed)
    rejected = Verdict("failed", 554, "5.7.1", "rejected at DATA")
    result = followups(job, dict.fromkeys(job.recipients, rejected), now=T0, policy=RetryPolicy(),
                       server="mx")
    return sum(len(encode(dead)) for dead in result.dead), result.dead


def test_each_dead_letter_holds_only_its_own_recipient_so_their_size_grows_linearly() -> None:
    small, _ = dead_letter_bytes(100)
    large, dead = dead_letter_bytes(1000)
    assert len(dead) == 1000
    everyone = storm(1000).recipients
    assert [d.routed.recipients for d in dead] == [(person,) for person in everyone]
    assert all(d.routed.suppressed == () for d in dead)
    assert {d.routed_recipients for d in dead} == {1000}
    assert {d.routed.raw for d in dead} == {storm(1).raw}  # the message itself is kept for `dlq retry`
    # Linear: ten times the recipients is ten times the bytes (the square would be a hundred times).
    assert 9.9 < large / small < 10.1, (small, large)


def test_a_retry_keeps_the_routed_message_once_with_every_waiting_recipient() -> None:
    job = Job.first(storm(300))
    result = followups(job, dict.fromkeys(job.recipients, DEFERRED), now=T0, policy=RetryPolicy(),
                       server="mx")
    assert result.retry is not None
    assert result.retry.recipients == job.recipients
    assert len(encode(result.retry)) < 2 * len(encode(job.routed))
