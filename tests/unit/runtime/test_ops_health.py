"""services/runtime/health.py: the liveness decision and the progress tracker (the HTTP side runs in
tests/integration/test_operations.py)."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest

from schemas.topics import ROUTED, TOPICS
from services.runtime.embedded import EmbeddedLog
from services.runtime.health import LagWatch, ProgressTracker, is_live, serve_health
from services.runtime.log import LogError, Outgoing, TopicPartition
from services.runtime.metrics import Metrics
from services.runtime.ops_log import OpsLog
from services.runtime.outage import BrokerOutage
from services.runtime.settings import ConfigError, DeploymentSettings
from services.runtime.stages import declared_stages, router_internal_topics, stages_run_by
from tests.unit.runtime.test_ops_metrics import samples


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("lag", "last_progress_at", "now", "live"),
    [
        (0, 0.0, 10_000.0, True),  # idle for hours with nothing to do: fine
        (5, 100.0, 399.0, True),  # work waits, progress 299 s ago
        (5, 100.0, 400.0, False),  # work waits, no progress for the whole stall time: restart
        (5, 100.0, 100.0, True),
    ],
)
def test_a_stage_is_dead_only_when_work_waits_and_nothing_moved(
    lag: int, last_progress_at: float, now: float, live: bool
) -> None:
    assert is_live(lag, last_progress_at, now, stall_after=300.0) is live


def test_the_tracker_fails_after_the_stall_time_and_heals_on_progress() -> None:
    clock = Clock()
    tracker = ProgressTracker(stall_after=60.0, clock=clock)
    tracker.observe_lag(3)
    clock.now += 59
    assert tracker.live()
    clock.now += 1
    assert not tracker.live()
    assert tracker.status()["seconds_since_progress"] == 60.0
    tracker.progressed()
    assert tracker.live()


def test_being_caught_up_counts_as_progress() -> None:
    clock = Clock()
    tracker = ProgressTracker(stall_after=60.0, clock=clock)
    clock.now += 3600
    tracker.observe_lag(0)
    tracker.observe_lag(7)  # work arrives after an idle hour: the stage gets the full stall time
    clock.now += 30
    assert tracker.live()


def test_a_committed_offset_moving_forward_is_progress() -> None:
    clock = Clock()
    tracker = ProgressTracker(stall_after=60.0, clock=clock)
    tp = TopicPartition("fetched", 0)
    tracker.observe_committed({tp: 5})
    tracker.observe_lag(2)
    clock.now += 100
    tracker.observe_committed({tp: 5})
    assert not tracker.live()
    tracker.observe_committed({tp: 6})
    assert tracker.live()


def test_readiness_is_what_the_stage_says() -> None:
    tracker = ProgressTracker(broker=BrokerOutage())
    assert not tracker.ready
    tracker.mark_ready()
    assert tracker.status()["ready"]


def test_a_started_stage_is_not_ready_while_its_broker_is_unreachable_and_ready_again_after() -> None:
    broker = BrokerOutage(clock=Clock())
    tracker = ProgressTracker(broker=broker)
    tracker.mark_ready()
    broker.failed("deliverer: fetch: KafkaConnectionError: Unable to bootstrap")
    assert not tracker.ready
    assert tracker.status() | {"seconds_since_progress": 0} == tracker.status() | {
        "ready": False, "started": True, "broker_reachable": False, "seconds_since_progress": 0}
    broker.recovered()
    assert tracker.ready
    tracker.mark_ready(False)  # the stage itself stopped (the router starting its app again)
    assert not tracker.ready


def test_a_stage_with_work_and_no_progress_fails_within_about_a_minute_by_default() -> None:
    clock = Clock()
    tracker = ProgressTracker(clock=clock)
    tracker.observe_lag(4)
    clock.now += 61
    assert not tracker.live()


def test_a_long_delivery_in_flight_is_not_a_stall_and_its_end_is_progress() -> None:
    clock = Clock()
    tracker = ProgressTracker(stall_after=60.0, clock=clock)
    tracker.observe_lag(1)
    with tracker.working():  # a 50 MB mail over a slow link
        clock.now += 600
        assert tracker.live()
    assert tracker.live()  # it ended just now
    clock.now += 60
    assert not tracker.live()  # nothing since, with work waiting


class _AwayError(LogError):
    """The broker does not answer (a retriable LogError)."""


class _UnreachableLog:
    """Every call of the ops interface fails as with the broker away."""

    def __getattr__(self, name: str) -> Callable[..., Awaitable[None]]:
        async def away(*_: object, **__: object) -> None:
            raise _AwayError("kafka: describe: KafkaConnectionError: Unable to bootstrap")

        return away


async def test_a_stage_waiting_for_the_broker_is_not_taken_for_stalled() -> None:
    clock = Clock()
    tracker = ProgressTracker(stall_after=60.0, clock=clock)
    tracker.observe_lag(5)  # work was waiting when the broker went away
    clock.now += 3600
    watch = LagWatch(cast(OpsLog, _UnreachableLog()), stages_run_by(DeploymentSettings(), "deliverer"))
    await watch.poll(tracker, Metrics())
    assert tracker.live()
    assert tracker.lag == 0  # unknown while the log cannot be read: no restart that cannot help


class _CountingLog:
    """The embedded log, counting each read of a group's committed offsets (one per stage and topic)."""

    def __init__(self, log: EmbeddedLog) -> None:
        self._log = log
        self.committed_reads: Counter[tuple[str, str]] = Counter()

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        self.committed_reads[group, topic] += 1
        return await self._log.committed(group, topic)

    def __getattr__(self, name: str) -> object:
        return getattr(self._log, name)


async def test_one_poll_of_a_services_watch_reads_each_stage_once_for_liveness_and_every_gauge(
    tmp_path: Path,
) -> None:
    settings = DeploymentSettings()
    embedded = EmbeddedLog(tmp_path / "log.sqlite", synchronous="NORMAL")
    await embedded.ensure_topics([*TOPICS, *router_internal_topics(settings)])
    async with embedded.producer() as producer:
        await producer.send_all([Outgoing(ROUTED, b"r", key=b"k") for _ in range(2)])
    log, metrics, tracker = _CountingLog(embedded), Metrics(process=False), ProgressTracker()
    await LagWatch.of(cast(OpsLog, log), settings, "deliverer").poll(tracker, metrics)
    declared = {(stage.group, topic) for stage in declared_stages(settings) for topic in stage.topics}
    assert log.committed_reads == dict.fromkeys(declared, 1)  # the router's too: the pipeline gauges
    assert tracker.lag == 2
    found = samples(metrics)
    assert ("popbridge_dead_letter_records", ()) in found
    assert any(name == "popbridge_consumer_lag" and ("stage", "router") in labels for name, labels in found)


async def test_a_busy_health_port_is_a_config_error_naming_the_variable() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="POPBRIDGE_HTTP_PORT: cannot listen on"):
            async with serve_health(port, ProgressTracker(), Metrics(), host="127.0.0.1"):
                pass
