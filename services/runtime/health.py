"""Liveness, readiness and metrics of one service over HTTP: /healthz, /readyz and /metrics.

Liveness (`is_live`) fails when work waits (lag > 0) and the stage has made no progress for
`stall_after` seconds. faust agents are known to stall silently after a rebalance: the process stays up,
the group keeps its partitions and nothing moves. Kubernetes restarts a container whose liveness probe
fails, and the restart heals it. Being caught up counts as progress, so an idle stage that suddenly
gets work has the full `stall_after` to start on it.

Progress comes from three sources, any is enough:
- the stage calls `tracker.progressed()` after it handled (committed) something;
- work is in flight inside `with tracker.working():` (an SMTP attempt; bounded by its own timeouts), and
  the start and the end of each such piece of work count as progress;
- the lag watch (`LagWatch`, polled every `interval` seconds) sees a committed offset of the group move.
The watch reads the group's lag through the log, so it works for the faust router without hooks into
faust; it also sets the `popbridge_consumer_lag` / `popbridge_oldest_unprocessed_seconds` gauges.
Lag and commits are the group's, not this replica's. With one replica per stage (the default) that is
exact. With several, a healthy replica's commits would hide a stalled one: there, let the stages call
`progressed()` and build the watch with `progress_from_commits=False`; a replica that is idle while
another one stalls then fails its probe too, and restarting it is harmless.

The watch built by `LagWatch.of` reads every declared stage, not only the service's own: one read per
interval sets the pipeline gauges (services.runtime.pipeline_gauges) and feeds this service's liveness.

Readiness: the stage calls `tracker.mark_ready()` once it is connected and has its partitions; from then
on it is ready while the process sees the broker (services.runtime.outage.BROKER: an aiokafka client or a
stage failing to reach it makes it down, any Kafka call that succeeds again, or a consumer finding its
coordinator, makes it up). A stage that cannot reach its broker does no work, whatever it started with.
The lag watch's poll reports to the same account, so a process with no other Kafka traffic sees an outage
(and its end) within one `interval`.

    metrics, tracker = Metrics(), ProgressTracker()
    watch = LagWatch.of(kafka_log(settings), settings, "deliverer")
    async with serve_health(settings.http_port or None, tracker, metrics, watch=watch):
        ...  # run the stage; tracker.mark_ready() once connected
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from services.runtime.lag import StageLag
from services.runtime.log import LogError, TopicPartition
from services.runtime.metrics import Metrics
from services.runtime.ops_log import OpsLog, stage_lag
from services.runtime.outage import BROKER, BrokerOutage
from services.runtime.pipeline_gauges import poll_pipeline
from services.runtime.polling import polling
from services.runtime.settings import ConfigError, DeploymentSettings
from services.runtime.stages import Stage, stages_run_by

if TYPE_CHECKING:
    # aiohttp is imported where a server starts: at module level it was a third of the CPU of importing
    # `popbridge run` (0.15-0.25 s of 0.6 s), paid also by `run --until-idle` and the ops commands, which
    # serve nothing (py-spy and -X importtime, bench/e2e.py).
    from aiohttp import web

Clock = Callable[[], float]
# About a minute: Kubernetes restarts a stage that has work and does nothing for this long. Slow work does
# not count as a stall: an SMTP attempt in flight (a 50 MB mail over a slow link) is progress (`working`).
DEFAULT_STALL_AFTER = 60.0

log = logging.getLogger("popbridge.health")


def is_live(lag: int, last_progress_at: float, now: float, stall_after: float) -> bool:
    """Live unless records wait (`lag` > 0) and nothing progressed for `stall_after` seconds."""
    return lag <= 0 or now - last_progress_at < stall_after


class ProgressTracker:
    """What the health endpoints report on: progress, the last known lag and readiness.

    `clock` is monotonic seconds (time.monotonic); tests inject one, and `broker` (the process's account of
    the broker, services.runtime.outage.BROKER).
    """

    def __init__(
        self, *, stall_after: float = DEFAULT_STALL_AFTER, clock: Clock = time.monotonic,
        broker: BrokerOutage = BROKER,
    ) -> None:
        self.stall_after = stall_after
        self._clock = clock
        self._broker = broker
        self.last_progress_at = clock()
        self.lag = 0
        self.started = False
        self._working = 0
        self._committed: dict[TopicPartition, int] | None = None  # None: not observed yet

    def progressed(self) -> None:
        """The stage handled something; call it after each commit (cheap)."""
        self.last_progress_at = self._clock()

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """A piece of work in flight: the stage is live while it runs; its start and end are progress."""
        self._working += 1
        self.progressed()
        try:
            yield
        finally:
            self._working -= 1
            self.progressed()

    def mark_ready(self, ready: bool = True) -> None:
        """The stage is connected and working (False: it stopped, or is starting again)."""
        self.started = ready

    @property
    def ready(self) -> bool:
        """Started, and the broker reachable (see the module docstring)."""
        return self.started and not self._broker.down

    def observe_lag(self, lag: int) -> None:
        """The stage's current lag; being caught up counts as progress."""
        self.lag = lag
        if lag <= 0:
            self.progressed()

    def observe_committed(self, committed: Mapping[TopicPartition, int]) -> None:
        """The group's committed offsets: one that moved forward (or appeared) since last is progress."""
        before = self._committed
        if before is not None and any(offset > before.get(tp, -1) for tp, offset in committed.items()):
            self.progressed()
        self._committed = dict(committed)

    def seconds_since_progress(self) -> float:
        return max(0.0, self._clock() - self.last_progress_at)

    def live(self) -> bool:
        if self._working:
            return True
        return is_live(self.lag, self.last_progress_at, self._clock(), self.stall_after)

    def status(self) -> dict[str, Any]:
        since = round(self.seconds_since_progress(), 3)
        return {"live": self.live(), "ready": self.ready, "started": self.started,
                "broker_reachable": not self._broker.down, "lag": self.lag, "seconds_since_progress": since,
                "stall_after": self.stall_after}


@dataclass
class LagWatch:
    """Poll the lag of a service's stages every `interval` seconds (see the module docstring).

    Every stage's lag goes to the gauges; liveness looks at the stages whose records do not wait on
    purpose, and the waiting ones (the deliverer's retry tiers) add up to `popbridge_retries_in_flight`.
    With `pipeline` (the deployment's settings), the one read covers every declared stage and the dead
    letters too, for the pipeline gauges (`stages` must be among the declared ones).
    """

    log: OpsLog
    stages: Sequence[Stage]
    interval: float = 30.0
    progress_from_commits: bool = True
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    pipeline: DeploymentSettings | None = None

    @classmethod
    def of(
        cls, log: OpsLog, settings: DeploymentSettings, service: str, *, interval: float = 30.0,
        progress_from_commits: bool = True,
    ) -> LagWatch:
        """The watch of one service ("router", "deliverer") of this deployment, pipeline gauges included."""
        return cls(log, stages_run_by(settings, service), interval, progress_from_commits, pipeline=settings)

    async def read(self, metrics: Metrics) -> list[StageLag]:
        """The lag of this service's stages; every stage read sets its gauges."""
        now = self.now()
        if self.pipeline is not None:
            by_stage = await poll_pipeline(self.log, self.pipeline, metrics, now)
            return [by_stage[stage.name] for stage in self.stages]
        reports = await asyncio.gather(*(stage_lag(self.log, stage, now) for stage in self.stages))
        for report in reports:
            metrics.observe_lag(report)
        return reports

    async def poll_once(self, tracker: ProgressTracker, metrics: Metrics) -> None:
        reports = await self.read(metrics)
        working = [r for r in reports if not r.waits]
        if self.progress_from_commits:
            tracker.observe_committed({tp: o for r in working for tp, o in r.committed_offsets().items()})
        tracker.observe_lag(sum(r.total for r in working))
        if len(working) < len(reports):
            metrics.retries_in_flight.set(sum(r.total for r in reports if r.waits))

    async def poll(self, tracker: ProgressTracker, metrics: Metrics) -> None:
        """One poll; when the log cannot be read, the gauges keep their last values and the failure is
        logged (within the broker outage's bound of lines)."""
        try:
            await self.poll_once(tracker, metrics)
        except LogError as exc:
            # No known work while the log cannot be read: a stage waiting for the broker is not stalled,
            # and a restart would not bring the broker back. The stall clock starts again when it answers.
            tracker.observe_lag(0)
            what = f"lag watch of {', '.join(s.name for s in self.stages)} failed: {exc}"
            if exc.retriable:
                BROKER.failed(what)
            else:
                log.warning("%s", what)


@dataclass
class HealthServer:
    """The running endpoints; `port` is the bound port (None when serving is switched off)."""

    port: int | None


def health_app(tracker: ProgressTracker, metrics: Metrics) -> web.Application:
    """The aiohttp application behind the three endpoints."""
    from aiohttp import web  # noqa: PLC0415 -- imported when a server starts (see the top)

    async def healthz(_: web.Request) -> web.Response:
        return _json(tracker.status(), ok=tracker.live())

    async def readyz(_: web.Request) -> web.Response:
        return _json(tracker.status(), ok=tracker.ready)

    async def metrics_page(_: web.Request) -> web.Response:
        metrics.seconds_since_progress.set(tracker.seconds_since_progress())
        return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app


def _json(body: dict[str, Any], *, ok: bool) -> web.Response:
    from aiohttp import web  # noqa: PLC0415 -- imported when a server starts (see the top)

    return web.Response(text=json.dumps(body), status=200 if ok else 503, content_type="application/json")


@asynccontextmanager
async def serve_health(
    port: int | None,
    tracker: ProgressTracker,
    metrics: Metrics,
    *,
    watch: LagWatch | None = None,
    host: str | None = None,
) -> AsyncIterator[HealthServer]:
    """Serve /healthz, /readyz and /metrics on `port` (0: any free port; None: no server) and run the lag
    watch, for the duration of the block. `host` None listens on every interface, as probes need."""
    runner: web.AppRunner | None = None
    try:
        bound: int | None = None
        if port is not None:
            from aiohttp import web  # noqa: PLC0415 -- imported when a server starts (see the top)

            runner = web.AppRunner(health_app(tracker, metrics), access_log=None)
            await runner.setup()
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:  # a deployment mistake (two stages on one port), not a crash
                raise ConfigError(f"environment: POPBRIDGE_HTTP_PORT: cannot listen on {port}: "
                                  f"{exc.strerror or exc}") from None
            bound = int(runner.addresses[0][1])
        watching = polling(partial(watch.poll, tracker, metrics), watch.interval) if watch else None
        async with watching or contextlib.nullcontext():
            yield HealthServer(bound)
    finally:
        if runner is not None:
            await runner.cleanup()
