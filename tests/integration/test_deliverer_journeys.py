"""Journeys through the deliverer: routed events on the real broker, copies into real SMTP servers."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import msgspec
import pytest

from schemas.events import DeliveryAttempted, DeliveryDeadLettered, RecipientDelivered
from schemas.topics import DEAD_LETTERS, DELIVERED, DELIVERY_ATTEMPTS
from services.deliverer.retry import EXPIRED, REJECTED, RetryPolicy
from services.deliverer.service import Counts, Deliverer
from services.deliverer.smtp import SmtpTransport
from services.runtime.settings import DeploymentSettings
from tests.support.deliverer import (
    MESSAGE,
    START,
    FakeClock,
    deliver_until_idle,
    deployment,
    publish,
    read_events,
    routed_event,
    smtp_target,
)
from tests.support.smtp import SmtpSink

pytestmark = pytest.mark.integration


async def test_each_recipient_gets_the_message_byte_for_byte_behind_one_received_line(
    kafka_bootstrap: str, kafka_topic_prefix: str, smtp_sink: SmtpSink
) -> None:
    settings, log = await deployment(kafka_bootstrap, kafka_topic_prefix)
    event = routed_event(recipients=("alice@example.com", "bob@example.com"))
    await publish(log, settings, event)

    counts = await deliver_until_idle(log, settings, smtp_target(smtp_sink.port), FakeClock())

    assert counts.delivered == 2
    [received] = smtp_sink.messages
    assert received.mail_from == "bob@remote.example"
    assert received.rcpt_tos == ("alice@example.com", "bob@example.com")
    trace, _, rest = received.content.partition(b"Tue, 01 Dec 2026 09:00:00 +0000\r\n")
    assert rest == MESSAGE
    assert trace.replace(b"\r\n ", b" ") == (
        b"Received: from pop.isp.example by popbridge with POP3 id <%s>; " % event.fetch_id.encode()
    )
    attempts = await read_events(log, settings, DELIVERY_ATTEMPTS, DeliveryAttempted)
    assert [(a.recipient, a.outcome, a.smtp_code) for a in attempts] == [
        ("alice@example.com", "delivered", 250),
        ("bob@example.com", "delivered", 250),
    ]
    assert len(await read_events(log, settings, DELIVERED, RecipientDelivered)) == 2
    assert await read_events(log, settings, DEAD_LETTERS, DeliveryDeadLettered) == []


async def test_a_deferred_recipient_is_delivered_on_the_third_attempt_without_holding_up_others(
    kafka_bootstrap: str, kafka_topic_prefix: str, smtp_sink: SmtpSink
) -> None:
    settings, log = await deployment(kafka_bootstrap, kafka_topic_prefix)
    refusals = iter(["451 4.3.0 try later", "452 4.2.2 mailbox full"])
    smtp_sink.rcpt_reply = lambda address: next(refusals, None) if address == "slow@example.com" else None
    slow, quick = routed_event("u1", ["slow@example.com"]), routed_event("u2", ["quick@example.com"])
    await publish(log, settings, slow, quick)
    clock, target = FakeClock(), smtp_target(smtp_sink.port)

    first = await deliver_until_idle(log, settings, target, clock)
    assert (first.delivered, first.deferred) == (1, 1)
    assert [m.rcpt_tos for m in smtp_sink.messages] == [("quick@example.com",)]
    assert (await deliver_until_idle(log, settings, target, clock)).deferred == 0  # the retry is not due yet
    clock.advance(60)
    assert (await deliver_until_idle(log, settings, target, clock)).deferred == 1
    clock.advance(299)
    assert (await deliver_until_idle(log, settings, target, clock)).delivered == 0  # 5 min not yet over
    clock.advance(1)
    assert (await deliver_until_idle(log, settings, target, clock)).delivered == 1

    assert [m.rcpt_tos for m in smtp_sink.messages] == [("quick@example.com",), ("slow@example.com",)]
    attempts = [
        a
        for a in await read_events(log, settings, DELIVERY_ATTEMPTS, DeliveryAttempted)
        if a.recipient == "slow@example.com"
    ]
    assert [(a.attempt, a.outcome, a.enhanced_code) for a in attempts] == [
        (1, "deferred", "4.3.0"),
        (2, "deferred", "4.2.2"),
        (3, "delivered", None),
    ]
    assert [a.attempted_at - attempts[0].attempted_at for a in attempts] == [
        timedelta(0),
        timedelta(minutes=1),
        timedelta(minutes=6),
    ]


async def test_the_same_routed_event_consumed_twice_is_delivered_once(
    kafka_bootstrap: str, kafka_topic_prefix: str, smtp_sink: SmtpSink
) -> None:
    settings, log = await deployment(kafka_bootstrap, kafka_topic_prefix)
    event = routed_event(recipients=("alice@example.com", "bob@example.com"))
    await publish(log, settings, event)
    target = smtp_target(smtp_sink.port)
    await deliver_until_idle(log, settings, target, FakeClock())
    await publish(log, settings, event)  # the router replays it, in the same batch as a later one
    await publish(log, settings, event, routed_event("u2"))

    again = await deliver_until_idle(log, settings, target, FakeClock())
    replayed = DeploymentSettings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=kafka_topic_prefix,
        group_prefix=kafka_topic_prefix + "other",
    )  # a new group reads it all
    replay = await deliver_until_idle(log, replayed, target, FakeClock())

    assert (again.delivered, again.skipped) == (1, 4)
    assert (replay.delivered, replay.skipped) == (0, 7)
    assert sorted(m.rcpt_tos for m in smtp_sink.messages) == [
        ("alice@example.com",),
        ("alice@example.com", "bob@example.com"),
    ]


async def test_a_rejected_recipient_becomes_a_dead_letter_and_nobody_gets_a_bounce(
    kafka_bootstrap: str, kafka_topic_prefix: str, smtp_sink: SmtpSink
) -> None:
    settings, log = await deployment(kafka_bootstrap, kafka_topic_prefix)
    smtp_sink.rcpt_reply = {"gone@example.com": "550 5.1.1 no such user"}.get
    event = routed_event(recipients=("alice@example.com", "gone@example.com"))
    await publish(log, settings, event)

    counts = await deliver_until_idle(log, settings, smtp_target(smtp_sink.port), FakeClock())

    assert (counts.delivered, counts.failed) == (1, 1)
    [dead] = await read_events(log, settings, DEAD_LETTERS, DeliveryDeadLettered)
    assert (dead.recipient, dead.reason, dead.smtp_code, dead.enhanced_code, dead.smtp_text) == (
        "gone@example.com",
        REJECTED,
        550,
        "5.1.1",
        "5.1.1 no such user",
    )
    # The dead letter keeps the message, narrowed to the recipient it concerns (ROUTING.md section 6).
    assert dead.routed == msgspec.structs.replace(event, recipients=event.recipients[1:])
    assert dead.routed_recipients == 2
    assert [m.rcpt_tos for m in smtp_sink.messages] == [("alice@example.com",)]  # no bounce to bob@remote


async def test_a_copy_deferred_for_five_days_fails(
    kafka_bootstrap: str, kafka_topic_prefix: str, smtp_sink: SmtpSink
) -> None:
    settings, log = await deployment(kafka_bootstrap, kafka_topic_prefix)
    smtp_sink.rcpt_reply = lambda _: "421 4.3.2 going down"
    await publish(log, settings, routed_event())
    clock, target = FakeClock(), smtp_target(smtp_sink.port)
    policy = RetryPolicy(delays=(3600.0, 86400.0))  # 1 h, then daily: 6 attempts in 5 days

    runs: list[Counts] = []
    while not (runs and runs[-1].failed):
        runs.append(await deliver_until_idle(log, settings, target, clock, policy))
        clock.advance(86400)

    assert sum(r.deferred for r in runs) == 5
    [dead] = await read_events(log, settings, DEAD_LETTERS, DeliveryDeadLettered)
    assert (dead.reason, dead.attempts, dead.smtp_code) == (EXPIRED, 6, 421)
    assert dead.dead_lettered_at == START + timedelta(days=5)


async def test_a_running_deliverer_sleeps_until_a_retry_is_due_and_stops_when_told(
    kafka_bootstrap: str, kafka_topic_prefix: str, smtp_sink: SmtpSink
) -> None:
    settings, log = await deployment(kafka_bootstrap, kafka_topic_prefix)
    refusals = iter(["451 4.3.0 try later"])
    smtp_sink.rcpt_reply = lambda _: next(refusals, None)
    await publish(log, settings, routed_event())
    clock, stop = FakeClock(), asyncio.Event()

    async with SmtpTransport(smtp_target(smtp_sink.port)) as transport:
        stage = Deliverer(log, settings, transport, clock=clock, poll_seconds=0.2)
        running = asyncio.create_task(stage.run(stop=stop))
        await asyncio.to_thread(smtp_sink.wait_for, 1)
        stop.set()
        counts = await asyncio.wait_for(running, 10)

    assert (counts.deferred, counts.delivered) == (1, 1)
    assert clock.now() - START >= timedelta(minutes=1)
