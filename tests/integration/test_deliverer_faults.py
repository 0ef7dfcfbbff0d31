"""The deliverer under Kafka's normal life and faults, on a real broker: rebalances, lost partitions, a
broker restart. Each test reproduces a crash or duplicate seen in the chaos runs (issue 13)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas.topics import ROUTED
from services.deliverer.outcome import Verdict
from services.deliverer.retry import RetryPolicy
from services.deliverer.service import Deliverer
from services.runtime.kafka import KafkaLog
from services.runtime.log import LogError, Outgoing
from services.runtime.settings import DeploymentSettings
from tests.support.deliverer import FakeClock, deployment, publish, routed_event, running_deliverer
from tests.support.kafka import start_local_broker, stop_local_broker
from tests.support.mail_config import delivery_to, mailbox, write_mail_config
from tests.support.smtp import DataGate, SmtpSink
from tests.support.stages import stage_environ, stage_process

pytestmark = pytest.mark.integration

COORDINATOR = "aiokafka.consumer.group_coordinator"
OUTAGE = 12.0  # seconds the broker is away in the restart test: longer than the retry delay (8 s)


class Revocations(logging.Handler):
    """Sets `seen` when aiokafka revokes partitions of `group` from a member (it logs that at INFO level
    right before it calls the rebalance listener)."""

    def __init__(self, group: str) -> None:
        super().__init__(logging.INFO)
        self.group = group
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        ours = message.startswith("Revoking") and message.endswith(f"group {self.group}")
        if ours and "set()" not in message:  # the first join revokes nothing
            self.seen.set()


@pytest.fixture
def revocations() -> Iterator[type[Revocations]]:
    logger = logging.getLogger(COORDINATOR)
    before = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield Revocations
    finally:
        logger.setLevel(before)


async def drained(log: KafkaLog, settings: DeploymentSettings) -> None:
    """Until the deliverer group committed the routed topic to its end."""
    topic, group = settings.topic(ROUTED), settings.group("deliverer")
    ends = {p: o for p, o in (await log.end_offsets(topic)).items() if o > 0}
    while True:  # committed offsets are only to be polled
        if {p: o for p, o in (await log.committed(group, topic)).items() if p in ends} == ends:
            return
        await asyncio.sleep(0.2)


def copies(sink: SmtpSink) -> Counter[str]:
    return Counter(r for m in sink.messages for r in m.rcpt_tos)


async def test_a_replica_joining_mid_batch_duplicates_nothing_and_crashes_nothing(
    kafka_bootstrap: str, kafka_topic_prefix: str, smtp_sink: SmtpSink, revocations: type[Revocations]
) -> None:
    # Seen in the chaos runs: both deliverers sent the same batch (22 and 10 copies twice), then the first
    # one crashed committing partitions no longer assigned (IllegalStateError / CommitFailedError).
    settings, log = await deployment(kafka_bootstrap, kafka_topic_prefix)
    recipients = [f"user{i}@example.com" for i in range(18)]
    await publish(log, settings, *(routed_event(f"u{i}", [r]) for i, r in enumerate(recipients)))
    gate = DataGate(hold=60.0)
    smtp_sink.data_reply = gate
    watch = revocations(settings.group("deliverer"))
    logging.getLogger(COORDINATOR).addHandler(watch)
    try:
        async with running_deliverer(log, settings, smtp_sink.port) as first:
            assert await asyncio.to_thread(gate.reached.wait, 60)  # the first replica's batch is in SMTP
            async with running_deliverer(log, settings, smtp_sink.port) as second:
                await asyncio.wait_for(watch.seen.wait(), 60)  # the join revokes the first one's partitions
                gate.open.set()
                await asyncio.wait_for(drained(log, settings), 120)
                assert not second.done()
            assert not first.done()
    finally:
        logging.getLogger(COORDINATOR).removeHandler(watch)
    assert first.exception() is None
    assert second.exception() is None
    assert copies(smtp_sink) == Counter(recipients)  # every recipient exactly once


async def test_a_commit_for_partitions_lost_in_a_rebalance_is_a_retriable_log_error(
    kafka_bootstrap: str, kafka_topic_prefix: str
) -> None:
    # aiokafka raises IllegalStateError (not retriable) for it; the deliverer's TaskGroup died of it.
    settings, log = await deployment(kafka_bootstrap, kafka_topic_prefix)
    topic, group = settings.topic(ROUTED), settings.group("probe")
    async with log.producer() as producer:
        await producer.send_all([Outgoing(topic, b"x", f"k{i}".encode()) for i in range(12)])
    async with log.consumer(group, [topic]) as first:
        while not await first.fetch(0.2):
            pass
        held = first.assignment()
        async with log.consumer(group, [topic]) as second:
            # Until the rebalance is over for both members (between its JoinGroup and SyncGroup a member
            # still holds the old assignment, with the new generation: the broker would take that commit).
            while not (second.assignment() and first.assignment()):
                await second.fetch(0.2)
                await first.fetch(0.05)
            lost = held - first.assignment()
            assert lost
            with pytest.raises(LogError) as refused:
                await first.commit(dict.fromkeys(lost, 1))
    assert refused.value.retriable


async def test_a_running_deliverer_rides_out_a_broker_restart(
    own_broker: tuple[str, Path], kafka_topic_prefix: str, smtp_sink: SmtpSink
) -> None:
    # Seen in the chaos runs: running deliverers died when the broker stopped (an ExceptionGroup around
    # connect: a retry tier reopening its consumer while the broker was away).
    bootstrap, directory = own_broker
    settings, log = await deployment(bootstrap, kafka_topic_prefix)
    refusals = iter(["451 4.3.0 try again later"])
    smtp_sink.rcpt_reply = lambda _: next(refusals, None)
    policy = RetryPolicy(delays=(8.0,))
    async with running_deliverer(log, settings, smtp_sink.port, policy) as stage:
        await publish(log, settings, routed_event("u1", ["alice@example.com"], routed_at=datetime.now(UTC)))
        await asyncio.to_thread(smtp_sink.wait_for_refusals, 1, 60)  # deferred: retry tier 1 due in 8 s
        await asyncio.to_thread(stop_local_broker, directory)
        await asyncio.sleep(OUTAGE)  # the fault: the broker stays away past the retry's due time
        assert not stage.done()
        restarted, problem = await asyncio.to_thread(start_local_broker, directory)
        assert restarted == bootstrap, problem
        back = time.monotonic()
        await asyncio.to_thread(smtp_sink.wait_for, 1, 60)
        print(f"delivered {time.monotonic() - back:.1f} s after the broker was ready again")
        assert not stage.done()
    assert stage.exception() is None
    assert copies(smtp_sink) == Counter({"alice@example.com": 1})


async def test_a_deliverer_started_before_the_broker_waits_for_it_then_delivers(
    own_broker: tuple[str, Path], kafka_topic_prefix: str, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    # Seen in the chaos runs: started while the broker was down, the deliverer exited (one line, but gone);
    # it also wrote JSON although POPBRIDGE_LOG_FORMAT=text asked for text.
    bootstrap, directory = own_broker
    settings, log = await deployment(bootstrap, kafka_topic_prefix)
    await asyncio.to_thread(stop_local_broker, directory)
    config = write_mail_config(tmp_path / "mail.toml", delivery=delivery_to(smtp_sink.port),
                               mailboxes=[mailbox("alice", "127.0.0.1", 110, "alice")])
    async with stage_process("deliverer", config, stage_environ(bootstrap, settings)) as stage:
        first = await stage.next_line()
        assert "Unable connect to" in first  # the first failure, as a text line
        assert not first.startswith("{")
        restarted, problem = await asyncio.to_thread(start_local_broker, directory)
        assert restarted == bootstrap, problem
        await publish(log, settings, routed_event("u1", ["alice@example.com"], routed_at=datetime.now(UTC)))
        await asyncio.to_thread(smtp_sink.wait_for, 1, 60)


class HeldTransport:
    """A destination that defers `defer@` once and holds every copy for `slow@` until `release` is set:
    a batch whose other job runs long after the deferred one ended."""

    server = "held.test:25"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.second_try = asyncio.Event()
        self.holding = asyncio.Event()  # a slow@ copy is being held
        self.tries: Counter[str] = Counter()

    async def deliver(self, sender: str, recipients: Sequence[str], message: bytes) -> dict[str, Verdict]:
        verdicts = {}
        for recipient in recipients:
            self.tries[recipient] += 1
            if recipient.startswith("slow@"):
                self.holding.set()
                await self.release.wait()
            if recipient.startswith("defer@") and self.tries[recipient] == 1:
                verdicts[recipient] = Verdict("deferred", 451, "4.2.0", "try again later")
                continue
            if recipient.startswith("defer@"):
                self.second_try.set()
            verdicts[recipient] = Verdict("delivered", 250, "2.0.0", "queued")
        return verdicts


async def test_a_retry_due_while_its_batch_still_runs_is_attempted_not_skipped(
    kafka_bootstrap: str, kafka_topic_prefix: str
) -> None:
    # Seen in the chaos runs: a deferred copy's retry fell due while another copy of the same batch was
    # still in its SMTP transaction; the retry tier took the pair for "in flight" in this process, skipped
    # the retry and committed past it. The copy was never tried again (lost). The routed topic and the
    # tiers are now read by one loop, so the retry comes after the batch: it must be tried then.
    settings, log = await deployment(kafka_bootstrap, kafka_topic_prefix)
    await publish(log, settings, routed_event("u1", ["defer@example.com"]),
                  routed_event("u2", ["slow@example.com"]))
    transport, stop = HeldTransport(), asyncio.Event()
    stage = Deliverer(log, settings, transport, clock=FakeClock(), poll_seconds=0.2,
                      policy=RetryPolicy(delays=(0.0,)))  # due at once: while slow@ is still held
    task = asyncio.create_task(stage.run(stop=stop))
    try:
        await asyncio.wait_for(transport.holding.wait(), timeout=60)
        transport.release.set()
        await asyncio.wait_for(transport.second_try.wait(), timeout=60)
    finally:
        transport.release.set()
        stop.set()
        await asyncio.wait({task}, timeout=60)
    assert task.result().delivered == 2
