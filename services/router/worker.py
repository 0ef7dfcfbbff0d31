"""`popbridge router`: runs the faust router app until stopped, or until caught up with --until-idle.

The process outlives its faust app. Whatever Kafka recovers from (the broker unreachable at start or
later, a commit that failed in a rebalance, a coordinator that moved, a request that timed out) makes
faust raise from `start()` or crash the running app. The worker then reports not ready, logs one line,
waits (1 s growing to 30 s), and starts a fresh app, which resumes from the committed offsets: records
after them are routed again, repeats the deliverer's ledger absorbs. While the broker is out of reach those
lines go through the process's outage account (services.runtime.outage): the first, then one a minute.
Only a permanent error ends the process, with one line and a non-zero exit: the configuration (exit 2), or
what every stage counts as permanent (services.runtime.kafka_faults: a login or authorization Kafka refuses,
a record too large; exit 1).

    RouterCannotRun (click.ClickException, exit 1): Kafka refuses us for good
    ConfigError (services.runtime.settings, exit 2): the configuration or environment is wrong
    anything else from start() or as a crash reason: logged in one line, the app is started again
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import faust
from aiokafka.errors import KafkaConnectionError
from faust.exceptions import ConsistencyError

from schemas.topics import FETCHED, ROUTED
from services.router.app import create_app, internal_topics, repartition_topic
from services.runtime.connect import kafka_log
from services.runtime.context import CommandContext, pass_command_context
from services.runtime.health import LagWatch, ProgressTracker, serve_health
from services.runtime.idle import wait_until_idle
from services.runtime.kafka import KafkaLog
from services.runtime.kafka_faults import PERMANENT
from services.runtime.log import LogError
from services.runtime.metrics import Metrics
from services.runtime.outage import BROKER, BrokerOutage, is_unreachable
from services.runtime.settings import ConfigError, DeploymentSettings, MailConfig, load_config
from services.runtime.signals import stop_on_signals

log = logging.getLogger("popbridge.router")

RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds before starting again, per failure in a row
HEALTHY_RUN = 60.0  # seconds an app must have run for its crash to count as a first failure again
# Liveness: records wait and nothing was routed for this long. A rebalance with a table to restore takes
# seconds; a killed replica's partitions move after the 6 s session timeout (services.runtime.log).
STALL_AFTER = 60.0
_REASON_CHARS = 300
MAX_STATE_SLOTS = 16  # router replicas sharing one data directory (one machine, tests, chaos runs)

class MissingTopicError(LogError):
    """A topic the router needs is not there (yet): retried, as an operator may be creating it."""


class RouterCannotRun(click.ClickException):
    """Kafka refuses the router for good (a login, an authorization): one line, exit code 1."""


def is_permanent(reason: BaseException) -> bool:
    """Whether starting again cannot help: a configuration error, or a Kafka error faust raised as it is that
    services.runtime.kafka_faults counts as permanent (a refusal of who we are, a record too large)."""
    if isinstance(reason, (ConfigError, *PERMANENT)):
        return True
    return isinstance(reason, LogError) and not reason.retriable


def describe(reason: BaseException) -> str:
    """One line about `reason`, for the log."""
    text = " ".join(str(reason).split()) or "no detail"
    return f"{type(reason).__name__}: {text}"[:_REASON_CHARS]


def is_outage(reason: BaseException, broker_down: bool) -> bool:
    """Whether the app ended because the broker is out of reach: such restarts share the process's outage
    account (a few lines a minute) instead of one line each, which during a long outage is one every 30 s
    per router, on top of the clients' own."""
    if broker_down or isinstance(reason, KafkaConnectionError):
        return True
    return is_unreachable(str(reason)) or isinstance(reason.__cause__, KafkaConnectionError)


def restart_delay(failures_in_a_row: int) -> float:
    return RESTART_DELAYS[min(failures_in_a_row, len(RESTART_DELAYS)) - 1]


@dataclass
class Supervisor:
    """Runs one faust app after another until `stop` is set (or, with `until_idle`, all is routed)."""

    settings: DeploymentSettings
    config: MailConfig
    kafka: KafkaLog
    tracker: ProgressTracker
    metrics: Metrics
    stop: asyncio.Event
    until_idle: bool = False
    state_dir: Path | None = None  # None: the one `state_directory` gives for the settings
    broker: BrokerOutage = field(default_factory=lambda: BROKER)  # the process's, shared with its clients

    async def run(self) -> None:
        if self.state_dir is not None:
            return await self._run(self.state_dir)
        with state_directory(self.settings) as state_dir:
            return await self._run(state_dir)

    async def _run(self, state_dir: Path) -> None:
        failures = 0
        while not self.stop.is_set():
            started = time.monotonic()
            reason = await self._run_once(state_dir)
            if reason is None:
                return
            if isinstance(reason, ConfigError):
                raise reason
            if is_permanent(reason):
                raise RouterCannotRun(describe(reason))
            if isinstance(reason, ConsistencyError):
                discard_state(state_dir, reason)
            failures = 1 if time.monotonic() - started >= HEALTHY_RUN else failures + 1
            delay = restart_delay(failures)
            self._say_down(reason, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)

    def _say_down(self, reason: BaseException, delay: float) -> None:
        line = f"router down ({describe(reason)}); starting again in {delay:.0f} s"
        if is_outage(reason, self.broker.down):
            self.broker.failed(line)
        else:
            log.warning("%s", line)

    async def _run_once(self, state_dir: Path) -> BaseException | None:
        """Run one app to its end: None when stopped or idle, else why it ended."""
        app: faust.App | None = None
        try:
            # faust's assignor skips a topic missing at the first rebalance and its agent then never gets
            # a partition: the internal topics exist before any app starts (also `popbridge topics create`).
            await self.kafka.ensure_topics(internal_topics(self.settings))
            await self._check_topics()
            app = create_app(
                self.settings, self.config, metrics=self.metrics, security=self.kafka.security,
                progress=self.tracker.progressed, state_dir=state_dir,
            )
            await app.start()
            self.broker.recovered()
            self.tracker.mark_ready()
            return await self._until_done(app)
        except Exception as exc:  # everything is retried unless permanent: see the module docstring
            return exc
        finally:
            self.tracker.mark_ready(False)
            if app is not None:
                await _stop_quietly(app)

    async def _check_topics(self) -> None:
        """Every topic the app reads or writes is visible with its partitions before the app starts."""
        names = [self.settings.topic(FETCHED), self.settings.topic(ROUTED)]
        for name in [*names, *(spec.name for spec in internal_topics(self.settings))]:
            if not await self.kafka.partitions(name):
                raise MissingTopicError(f"topic {name} does not exist (`popbridge topics create` makes it)")

    async def _until_done(self, app: faust.App) -> BaseException | None:
        waits = {asyncio.ensure_future(self.stop.wait()), asyncio.ensure_future(app.wait_until_stopped())}
        idle = asyncio.ensure_future(self._idle()) if self.until_idle else None
        if idle is not None:
            waits.add(idle)
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        if idle is not None and idle in done and idle.exception() is not None:
            return idle.exception()
        if self.stop.is_set() or (idle is not None and idle in done):
            return None
        return app.crash_reason or RuntimeError("the faust app stopped by itself")

    async def _idle(self) -> None:
        topics = [self.settings.topic(FETCHED), repartition_topic(self.settings)]
        await wait_until_idle(self.kafka, self.settings.group("router"), topics)


def discard_state(state_dir: Path, reason: BaseException) -> None:
    """The local state is ahead of its changelog (faust's check: a changelog topic deleted and created
    again): drop it, so the next app restores every partition from the changelog as it is now."""
    log.warning("router state in %s does not match its changelog (%s); deleting it, the next start "
                "restores it from the changelog", state_dir, describe(reason))  # fmt: skip
    for path in state_dir.glob("*.sqlite3*"):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def state_directory(settings: DeploymentSettings) -> Iterator[Path]:
    """Where the router keeps its dedupe table's partitions: `<POPBRIDGE_DATA_DIR>/router`, kept across
    restarts (a restart then reads only the changelog's tail); without a data directory, a temporary
    one removed at exit (each start restores from the whole changelog, on disk, not in memory).

    Each replica locks its directory for its lifetime (the kernel drops the lock when the process dies,
    even by SIGKILL). A second replica on the same machine and data directory takes `router-2`, and so
    on: two processes never write one partition's file (in Kubernetes each pod has its own volume)."""
    if not settings.data_dir:
        temporary = Path(tempfile.mkdtemp(prefix="popbridge-router-"))
        log.info("no POPBRIDGE_DATA_DIR: router state in %s until exit, restored from the changelog",
                 temporary)  # fmt: skip
        try:
            yield temporary
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        return
    base = Path(settings.data_dir).expanduser()
    with contextlib.ExitStack() as held:
        for slot in range(1, MAX_STATE_SLOTS + 1):
            directory = base / ("router" if slot == 1 else f"router-{slot}")
            if _lock(directory, held):
                yield directory
                return
        raise ConfigError(f"environment: POPBRIDGE_DATA_DIR: {MAX_STATE_SLOTS} routers already use {base}")


def _lock(directory: Path, held: contextlib.ExitStack) -> bool:
    """Take the directory's lock, kept until `held` closes; False when another process holds it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = held.enter_context((directory / "LOCK").open("a"))
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


async def _stop_quietly(app: faust.App) -> None:
    """Stop a (maybe crashed, maybe half-started) app; what it raises while stopping changes nothing."""
    try:
        await app.stop()
    except Exception as exc:  # the next app starts from the committed offsets either way
        log.debug("stopping the faust app: %s", describe(exc))


async def run_router(settings: DeploymentSettings, config: MailConfig, *, until_idle: bool) -> None:
    """Serve health and run the supervisor until a signal (or idleness, or a permanent error)."""
    if not settings.kafka_bootstrap:
        raise ConfigError("environment: POPBRIDGE_KAFKA_BOOTSTRAP: the router service needs Kafka")
    kafka = kafka_log(settings)
    metrics, tracker = Metrics(), ProgressTracker(stall_after=STALL_AFTER)
    # Progress is this replica's routing (the agents call tracker.progressed): the group's commits would
    # let a healthy replica hide a stalled one. Lag without routing for STALL_AFTER fails /healthz.
    # The watch's one read of every stage's lag also keeps the pipeline gauges (services.runtime.health).
    watch = None if until_idle else LagWatch.of(kafka, settings, "router", progress_from_commits=False)
    port = None if until_idle else settings.http_port or None
    stop = asyncio.Event() if until_idle else stop_on_signals()  # --until-idle stops by itself
    async with serve_health(port, tracker, metrics, watch=watch):
        await Supervisor(settings, config, kafka, tracker, metrics, stop, until_idle).run()


@click.command()
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help="Mail config (TOML)."
)
@click.option("--until-idle", is_flag=True, help="Exit once every fetched message is routed and committed.")
@pass_command_context
def router(context: CommandContext, config_path: Path, until_idle: bool) -> None:
    """Route fetched messages to their local recipients (faust-streaming app)."""
    asyncio.run(run_router(context.settings, load_config(config_path), until_idle=until_idle))
