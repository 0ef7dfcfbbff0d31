"""services/ops/actions.py and services/runtime/ops_log.py on the embedded log: the same lag and replay
as on Kafka, for one machine."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.topics import RETRY_TOPICS, ROUTED, TopicSpec, topic_spec
from services.ops.actions import copy_window, execute_replay, plan_replay, plan_window
from services.runtime.embedded import EmbeddedLog
from services.runtime.health import LagWatch, ProgressTracker
from services.runtime.log import LogError, Outgoing, TopicPartition
from services.runtime.metrics import Metrics
from services.runtime.ops_log import stage_lag
from services.runtime.settings import DeploymentSettings
from services.runtime.stages import Stage

T = datetime(2026, 11, 27, 8, tzinfo=UTC)
STAGE = Stage("router", "g", ("fetched",))


class Clock:
    def __init__(self) -> None:
        self.now = T.timestamp()

    def __call__(self) -> float:
        return self.now


async def log_with_two_hours_of_records(path: Path, clock: Clock) -> EmbeddedLog:
    """Partition 0 gets records 0-4 at 08:00 and 5-9 at 09:00."""
    log = EmbeddedLog(path, clock=clock, synchronous="NORMAL")
    await log.ensure_topics([TopicSpec("fetched", 1)])
    async with log.producer() as producer:
        for _ in range(2):
            await producer.send_all([Outgoing("fetched", b"x", key=b"k") for _ in range(5)])
            clock.now += 3600
    return log


async def test_lag_and_the_oldest_waiting_record(tmp_path: Path) -> None:
    clock = Clock()
    log = await log_with_two_hours_of_records(tmp_path, clock)
    async with log.consumer("g", ["fetched"]) as consumer:
        await consumer.commit({TopicPartition("fetched", 0): 3})
    report = await stage_lag(log, STAGE, T + timedelta(hours=2))
    assert (report.total, report.partitions[0].committed, report.oldest_age) == (7, 3, 7200.0)


async def test_a_replay_moves_the_group_to_the_first_record_of_the_hour(tmp_path: Path) -> None:
    clock = Clock()
    log = await log_with_two_hours_of_records(tmp_path, clock)
    async with log.consumer("g", ["fetched"]) as consumer:
        await consumer.commit({TopicPartition("fetched", 0): 10})
        plan = await plan_replay(log, STAGE, T + timedelta(minutes=30))
        assert [(p.current, p.new) for p in plan.partitions] == [(10, 5)]
        with pytest.raises(LogError, match="live consumer"):
            await execute_replay(log, plan)
    assert await execute_replay(log, plan) == {TopicPartition("fetched", 0): 5}
    assert await log.committed("g", "fetched") == {0: 5}


async def test_a_window_replay_copies_the_hour_while_a_consumer_of_the_group_is_live(tmp_path: Path) -> None:
    clock = Clock()
    log = EmbeddedLog(tmp_path, clock=clock, synchronous="NORMAL")
    await log.ensure_topics([TopicSpec("fetched", 1)])
    async with log.producer() as producer:
        for hour in range(3):
            batch = [Outgoing("fetched", b"%d-%d" % (hour, i), key=b"k%d" % i) for i in range(2)]
            await producer.send_all(batch)
            clock.now += 3600
    async with log.consumer("g", ["fetched"]) as consumer:
        await consumer.commit({TopicPartition("fetched", 0): 6})
        plan = await plan_window(log, STAGE, T + timedelta(hours=1), T + timedelta(hours=2))
        assert [(p.start, p.end) for p in plan.partitions] == [(2, 4)]
        assert await copy_window(log, plan, chunk=1) == {0: 2}
    copies = [(r.offset, r.key, r.value) async for r in log.scan("fetched")][6:]
    assert copies == [(6, b"k0", b"1-0"), (7, b"k1", b"1-1")]
    assert await log.committed("g", "fetched") == {0: 6}


async def test_the_deliverer_watch_counts_retries_apart_from_its_liveness_lag(tmp_path: Path) -> None:
    settings = DeploymentSettings()
    log = EmbeddedLog(tmp_path, synchronous="NORMAL")
    await log.ensure_topics([topic_spec(ROUTED), *(topic_spec(t) for t in RETRY_TOPICS)])
    async with log.producer() as producer:
        await producer.send_all([Outgoing(ROUTED, b"r", key=b"%d" % i) for i in range(3)])
        await producer.send_all([Outgoing(RETRY_TOPICS[0], b"x", key=b"%d" % i) for i in range(2)])
    watch = LagWatch.of(log, settings, "deliverer")
    assert [s.name for s in watch.stages] == ["deliverer", *(f"deliverer-retry-{n}" for n in range(1, 6))]
    tracker, metrics = ProgressTracker(), Metrics(process=False)
    await watch.poll_once(tracker, metrics)
    assert tracker.lag == 3
    assert b"\npopbridge_retries_in_flight 2.0\n" in metrics.render()
