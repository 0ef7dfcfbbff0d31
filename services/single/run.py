"""`popbridge run`: the fetcher, the router (the plain loop) and the deliverer in one process.

The three stages still talk only through the log, exactly as in the Kubernetes deployment: the same
events, consumer groups, routing, retries and dead letters. Each stage commits only what is durable, so
a kill -9 at any moment loses nothing, and a restart delivers nothing twice that the delivered ledger
already holds. The one window no SMTP client can close is a kill after the server accepted a message
and before the ledger recorded it (RFC 1047): that copy is sent again.

`--until-idle`: one fetch pass, with the router and the deliverer already working on what it publishes
(so a hung mailbox holds up no other mailbox's mail); then the router until every fetched message is
routed, then the deliverer until every routed copy is handed over and no retry is due now (later retries
stay queued).

SIGTERM and SIGINT stop either mode at a safe point: a POP3 pass is abandoned (a session without QUIT
deletes nothing, and what was already published is deleted on the next run), the router and the
deliverer finish the batch in hand and commit it. Exit code 0 after SIGTERM, 130 after SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import click

from schemas.topics import FETCHED, PLAIN_ROUTER_TOPICS, ROUTED, TOPICS, TopicSpec
from services.deliverer.commands import notice_address, smtp_password, smtp_token
from services.deliverer.retry import RetryPolicy
from services.deliverer.service import Counts, Deliverer
from services.deliverer.smtp import SmtpTransport
from services.fetcher.commands import run_fetcher
from services.fetcher.service import PassResult
from services.router.loop import RouterCounts, RouterLoop
from services.runtime.connect import open_log
from services.runtime.context import CommandContext, pass_command_context
from services.runtime.embedded import EmbeddedLog
from services.runtime.health import HealthServer, LagWatch, ProgressTracker, serve_health
from services.runtime.idle import is_idle
from services.runtime.kafka import KafkaLog
from services.runtime.log import LogError
from services.runtime.metrics import Metrics
from services.runtime.pipeline_gauges import DEFAULT_INTERVAL
from services.runtime.settings import DeploymentSettings, MailConfig, load_config
from services.runtime.signals import StopSignals, until_stopped
from services.runtime.stages import stages_run_by

log = logging.getLogger("popbridge.run")

CLEAN_UP_EVERY = 3600.0  # seconds between two retention and compaction passes on the embedded log


def deployed_topics(settings: DeploymentSettings) -> list[TopicSpec]:
    """Every topic the single process uses, with the deployment's prefix."""
    specs = (*TOPICS, *PLAIN_ROUTER_TOPICS)
    return [TopicSpec(settings.topic(s.name), s.partitions, dict(s.config)) for s in specs]


@dataclass
class RunSummary:
    """What one run did: per mailbox fetch results, then router and deliverer counts."""

    fetched: list[PassResult] = field(default_factory=list)
    routed: RouterCounts = field(default_factory=RouterCounts)
    delivered: Counts = field(default_factory=Counts)
    stopped_by: signal.Signals | None = None  # the signal that ended the run early

    def lines(self) -> list[str]:
        lines = [
            f"fetch {r.mailbox_id}: published={r.published} deleted={r.deleted} too_big={r.too_big} "
            f"skipped={r.skipped} " + (f"error: {r.error}" if r.error else "ok")
            for r in self.fetched
        ]
        if self.stopped_by is not None:
            lines.insert(0, f"stopped by {self.stopped_by.name}: the fetch pass was abandoned, nothing "
                            "unpublished was deleted")  # fmt: skip
        routed, counts = self.routed, self.delivered
        lines.append(
            f"route: {routed.routed} routed, {routed.suppressed} duplicate copies suppressed, "
            f"{routed.postmaster} to the postmaster after an error, {routed.skipped} bad records skipped"
        )
        lines.append(
            f"deliver: {counts.delivered} delivered, {counts.deferred} deferred, {counts.failed} failed, "
            f"{counts.skipped} skipped as already delivered"
        )
        return lines


@dataclass
class Pipeline:
    """The three stages on one log. `poll_seconds` bounds how long an idle stage waits for records.

    Running until stopped, it serves /healthz, /readyz and /metrics on `health_port` (None: not served; 0:
    any free port), with the lag of every stage, as the separate services do; `serving` is set once the
    port is bound, and `health` then tells which."""

    log: KafkaLog | EmbeddedLog
    settings: DeploymentSettings
    config: MailConfig
    environ: Mapping[str, str]
    poll_seconds: float = 0.5
    summary: RunSummary = field(default_factory=RunSummary)
    metrics: Metrics = field(default_factory=Metrics)
    health_port: int | None = None
    health: HealthServer | None = None
    serving: asyncio.Event = field(default_factory=asyncio.Event)
    watch_interval: float = DEFAULT_INTERVAL  # seconds between two reads of every stage's lag

    async def run(self, *, until_idle: bool, stop: asyncio.Event) -> RunSummary:
        await self.log.ensure_topics(deployed_topics(self.settings))
        target = self.config.delivery
        policy = RetryPolicy(delays=target.retry_delays, max_age=timedelta(days=target.max_age_days))
        router = RouterLoop(self.log, self.settings, self.config, poll_seconds=self.poll_seconds,
                            metrics=self.metrics)
        password = smtp_password(target, self.environ)
        token = smtp_token(target, self.environ, self.settings.data_dir)
        async with SmtpTransport(target, password, token=token) as transport:
            # A batch is as large as the sessions that send it in parallel: a copy the server accepted is
            # in the ledger before the next batch starts, so a kill can catch at most this many copies
            # between the server's 250 and the ledger (RFC 1047's window), which a restart sends again.
            deliverer = Deliverer(
                self.log, self.settings, transport, policy=policy, poll_seconds=self.poll_seconds,
                batch_size=target.connections, postmaster=notice_address(self.config), metrics=self.metrics,
            )
            if until_idle:
                await self._until_idle(router, deliverer, stop)
            else:
                await self._forever(router, deliverer, stop)
        self.summary.routed, self.summary.delivered = router.counts, deliverer.counts
        return self.summary

    async def _until_idle(self, router: RouterLoop, deliverer: Deliverer, stop: asyncio.Event) -> None:
        passed = asyncio.Event()  # the fetch pass ended (or was abandoned on a signal)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._fetch_pass(stop, passed))
            tasks.create_task(router.run(stop=passed))
            tasks.create_task(deliverer.run(stop=passed))
        await self._drain(lambda: router.run(until_idle=True, stop=stop), "router", FETCHED, stop)
        await self._drain(lambda: deliverer.run(until_idle=True, stop=stop), "deliverer", ROUTED, stop)
        if not stop.is_set():
            await self._clean_up()

    async def _fetch_pass(self, stop: asyncio.Event, passed: asyncio.Event) -> None:
        try:
            fetching = run_fetcher(self.log, self.settings, self.config, dict(self.environ), once=True)
            self.summary.fetched = await until_stopped(fetching, stop) or []
        finally:
            passed.set()

    async def _drain(
        self, run_stage: Callable[[], Awaitable[object]], stage: str, topic: str, stop: asyncio.Event
    ) -> None:
        """Run a stage until its group has committed its whole input topic.

        A stage's own `until_idle` means "my partitions are read to the end". After a kill -9 the dead
        process still holds some partitions until the log takes it for dead (the embedded log's member
        timeout, Kafka's session timeout), so the stage is run again until every partition is done.
        """
        group, name = self.settings.group(stage), self.settings.topic(topic)
        while not stop.is_set():
            await run_stage()
            if is_idle(await self.log.end_offsets(name), await self.log.committed(group, name)):
                return
            log.info("%s: partitions of %s are still held by a stopped member; waiting", stage, name)
            await asyncio.sleep(self.poll_seconds)

    async def _forever(self, router: RouterLoop, deliverer: Deliverer, stop: asyncio.Event) -> None:
        tracker = ProgressTracker()
        stages = (*stages_run_by(self.settings, "router"), *stages_run_by(self.settings, "deliverer"))
        # One read of every stage's lag per interval: the pipeline gauges and this process's liveness.
        watch = LagWatch(self.log, stages, self.watch_interval, pipeline=self.settings)
        health = serve_health(self.health_port, tracker, self.metrics, watch=watch)
        try:
            async with health as self.health:
                self.serving.set()
                tracker.mark_ready()
                await self._stages(router, deliverer, stop)
        except ExceptionGroup as group:  # one stage failed and the others were stopped: report the first
            for other in group.exceptions[1:]:
                log.warning("another stage failed too: %r", other)
            raise group.exceptions[0] from None

    async def _stages(self, router: RouterLoop, deliverer: Deliverer, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tasks:
            fetcher = tasks.create_task(
                run_fetcher(self.log, self.settings, self.config, dict(self.environ), once=False,
                            metrics=self.metrics)
            )
            tasks.create_task(router.run(stop=stop))
            tasks.create_task(deliverer.run(stop=stop))
            tasks.create_task(self._clean_up_until(stop))
            # The fetcher has no stop switch: cancelling it between or inside POP3 sessions is safe (a
            # session without QUIT deletes nothing; what was published is deleted on the next pass).
            await stop.wait()
            fetcher.cancel()

    async def _clean_up_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._clean_up()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CLEAN_UP_EVERY)

    async def _clean_up(self) -> None:
        """On the embedded log, apply each topic's retention and compaction (a Kafka broker does its own):
        without it the log file keeps every message ever fetched."""
        if not isinstance(self.log, EmbeddedLog):
            return
        try:
            deleted = await self.log.clean_up()
        except LogError as exc:
            log.warning("embedded log clean-up failed, trying again later: %s", exc)
            return
        if any(deleted.values()):
            log.info("embedded log clean-up: %s", ", ".join(f"{t}: {n}" for t, n in deleted.items() if n))


async def run_until_signal(pipeline: Pipeline, *, until_idle: bool) -> RunSummary:
    """Run the pipeline; SIGTERM or SIGINT stops it after the batches in hand are committed."""
    with StopSignals() as signals:
        summary = await pipeline.run(until_idle=until_idle, stop=signals.stop)
    summary.stopped_by = signals.received
    return summary


def log_error_in(exc: BaseException) -> LogError | None:
    """The LogError that stopped a stage, also from inside a TaskGroup's exception group."""
    if isinstance(exc, LogError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        return next((e for e in map(log_error_in, exc.exceptions) if e is not None), None)
    return None


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The mail configuration (TOML): mailboxes, routing and the delivery server.",
)
@click.option(
    "--until-idle",
    is_flag=True,
    help="One fetch pass, then route and deliver until nothing is left to do now; then exit.",
)
@pass_command_context
def run(context: CommandContext, config_path: Path, until_idle: bool) -> None:
    """Fetch, route and deliver in one process.

    The log is the embedded one (SQLite in POPBRIDGE_DATA_DIR, default ~/.local/share/popbridge), or
    Kafka when POPBRIDGE_KAFKA_BOOTSTRAP is set. The router here is the plain loop, not the faust app,
    on either log: run one `popbridge run` per deployment, and not next to `popbridge router` (they
    share the router's consumer group). Topics are created on start.
    """
    settings, environ = context.settings, context.environ
    config = load_config(config_path)
    pipeline = Pipeline(open_log(settings), settings, config, environ, health_port=settings.http_port or None)
    try:
        summary = asyncio.run(run_until_signal(pipeline, until_idle=until_idle))
    except (LogError, ExceptionGroup) as exc:
        problem = log_error_in(exc)
        if problem is None:
            raise
        raise click.ClickException(f"log: {problem}") from None
    for line in summary.lines():
        click.echo(line)
    if summary.stopped_by is not None:
        raise SystemExit(130 if summary.stopped_by == signal.SIGINT else 0)
    if any(r.error for r in summary.fetched):
        raise SystemExit(1)
