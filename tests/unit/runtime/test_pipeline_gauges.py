"""services/runtime/pipeline_gauges.py on the embedded log: every stage's lag and the dead-letter size."""

from __future__ import annotations

import asyncio
from pathlib import Path

from schemas.topics import DEAD_LETTERS, RETRY_TOPICS, ROUTED, TOPICS
from services.runtime.embedded import EmbeddedLog
from services.runtime.log import Outgoing, TopicPartition
from services.runtime.metrics import Metrics
from services.runtime.pipeline_gauges import pipeline_watch, poll_pipeline
from services.runtime.settings import DeploymentSettings
from tests.unit.runtime.test_ops_metrics import samples

SETTINGS = DeploymentSettings()


async def pipeline_log(path: Path) -> EmbeddedLog:
    """Every topic; 3 dead letters, 4 routed copies of which the deliverer committed 1, 2 in retry tier 2."""
    log = EmbeddedLog(path / "log.sqlite", synchronous="NORMAL")
    await log.ensure_topics(list(TOPICS))
    async with log.producer() as producer:
        await producer.send_all([Outgoing(DEAD_LETTERS, b"d", key=b"k") for _ in range(3)])
        await producer.send_all([Outgoing(ROUTED, b"r", key=b"k") for _ in range(4)])
        await producer.send_all([Outgoing(RETRY_TOPICS[1], b"t", key=b"k") for _ in range(2)])
    ends = await log.end_offsets(ROUTED)
    routed = next(p for p, end in ends.items() if end == 4)  # one key: one partition
    async with log.consumer(SETTINGS.group("deliverer"), [ROUTED]) as consumer:
        await consumer.commit({TopicPartition(ROUTED, routed): 1})
    return log


async def test_one_poll_sets_every_stages_lag_and_the_dead_letter_size(tmp_path: Path) -> None:
    log, metrics = await pipeline_log(tmp_path), Metrics(process=False)
    await poll_pipeline(log, SETTINGS, metrics)
    found = samples(metrics)
    assert found[("popbridge_dead_letter_records", ())] == 3
    deliverer = [v for (name, labels), v in found.items()
                 if name == "popbridge_consumer_lag" and ("stage", "deliverer") in labels]
    assert sum(deliverer) == 3
    assert found[("popbridge_retry_depth", (("tier", "retry-2"),))] == 2
    assert found[("popbridge_retry_depth", (("tier", "retry-1"),))] == 0
    router = {labels for (name, labels), _ in found.items()
              if name == "popbridge_consumer_lag" and ("stage", "router") in labels}
    assert router  # reported although no router runs: a stage that is down is still watched


class RecordedGauge:
    """Stands in for a Gauge: each value set is queued, so the test awaits polls instead of sleeping."""

    def __init__(self) -> None:
        self.values: asyncio.Queue[float] = asyncio.Queue()

    def set(self, value: float) -> None:
        self.values.put_nowait(value)


async def test_the_watch_keeps_polling_until_the_block_ends(tmp_path: Path) -> None:
    log, metrics, gauge = await pipeline_log(tmp_path), Metrics(process=False), RecordedGauge()
    metrics.dead_letter_records = gauge  # type: ignore[assignment]  # only .set() is used by the watch
    async with pipeline_watch(log, SETTINGS, metrics, interval=0.01):
        assert await gauge.values.get() == 3
        async with log.producer() as producer:
            await producer.send_all([Outgoing(DEAD_LETTERS, b"d", key=b"k")])
        while await gauge.values.get() != 4:  # a poll already under way may still see 3
            pass
    polls = gauge.values.qsize()
    await asyncio.sleep(0.05)  # time for several polls, had the watch not stopped
    assert gauge.values.qsize() == polls
