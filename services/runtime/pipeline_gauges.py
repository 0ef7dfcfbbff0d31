"""Gauges of the whole pipeline read from topic offsets: every stage's lag and the dead-letter topic's size.

Every popbridge process (fetcher, router, deliverer, `run`) keeps these current, not only the stage they
concern: a stage that is down exports nothing, and its backlog is exactly what an operator must see then.
Alerts and the dashboard take the max over the reporting processes. A process that runs a LagWatch (the
router, the deliverer, `run`: services.runtime.health) gets these gauges from the watch's poll, which is
this module's `poll_pipeline`: one read of every stage's lag serves the gauges and the stage's liveness.
`pipeline_watch` is for a process without a lag watch (the fetcher).

A counter of dead letters (`popbridge_dead_letters_total`) starts at 0 with every process; the topic's
size (end minus start offsets, every partition) is what is really kept, whoever wrote it.

    async with pipeline_watch(log, settings, metrics):
        ...  # run the stage
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial

from schemas.topics import DEAD_LETTERS
from services.runtime.lag import StageLag
from services.runtime.log import LogError
from services.runtime.metrics import Metrics
from services.runtime.ops_log import OpsLog, stage_lag
from services.runtime.outage import BROKER
from services.runtime.polling import polling
from services.runtime.settings import DeploymentSettings
from services.runtime.stages import declared_stages

log = logging.getLogger("popbridge.metrics")

DEFAULT_INTERVAL = 30.0  # seconds: the lag watch's and the PodMonitor's interval
# Costs per poll: per stage topic a few offset lookups and one single-record read per lagging partition
# (services.runtime.ops_log), plus two offset lookups for the dead letters.


async def topic_records(ops: OpsLog, topic: str) -> int:
    """Records the topic keeps across its partitions."""
    ends, starts = await ops.end_offsets(topic), await ops.start_offsets(topic)
    return sum(max(0, end - starts.get(partition, 0)) for partition, end in ends.items())


async def poll_pipeline(
    ops: OpsLog, settings: DeploymentSettings, metrics: Metrics, now: datetime | None = None
) -> dict[str, StageLag]:
    """Set the lag gauges of every declared stage and the dead-letter size, once; the reports, by stage
    name, are returned for the caller's liveness (services.runtime.health.LagWatch)."""
    at = now or datetime.now(UTC)
    reports = await asyncio.gather(*(stage_lag(ops, s, at) for s in declared_stages(settings)))
    for report in reports:
        metrics.observe_lag(report)
    metrics.dead_letter_records.set(await topic_records(ops, settings.topic(DEAD_LETTERS)))
    return {report.stage: report for report in reports}


async def _poll_logged(ops: OpsLog, settings: DeploymentSettings, metrics: Metrics) -> None:
    try:
        await poll_pipeline(ops, settings, metrics)
    except LogError as exc:  # the broker is away, or a topic not created yet: keep the last values
        if exc.retriable:  # an outage: within its bound of lines (services.runtime.outage)
            BROKER.failed(f"pipeline gauges not read: {exc}")
        else:
            log.warning("pipeline gauges not read: %s", exc)


@contextlib.asynccontextmanager
async def pipeline_watch(
    ops: OpsLog, settings: DeploymentSettings, metrics: Metrics, *, interval: float = DEFAULT_INTERVAL
) -> AsyncIterator[None]:
    """Keep the pipeline gauges current (every `interval` seconds) for the duration of the block."""
    async with polling(partial(_poll_logged, ops, settings, metrics), interval):
        yield
