"""The router process on the real broker outlives what Kafka recovers from: it waits while the broker is
away at start (not ready, a few log lines) and starts a fresh app after its app crashed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import faust
import pytest
from aiokafka.errors import CommitFailedError

from schemas.topics import FETCHED, ROUTED
from services.router import worker
from services.router.app import create_app
from services.router.worker import Supervisor
from services.runtime.health import ProgressTracker
from services.runtime.kafka import KafkaConsumer, KafkaLog
from services.runtime.metrics import Metrics
from services.runtime.outage import BrokerOutage
from services.runtime.settings import DeploymentSettings
from tests.integration.test_router_dedupe import start_router_process
from tests.integration.test_router_rebalance import Pipeline, mail

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


class BrokerGate:
    """A bootstrap address for the broker that refuses connections until opened, as a broker that is
    still down does. Only bootstrap goes through it: the broker's metadata names its own address."""

    def __init__(self, broker: str) -> None:
        self.host, _, port = broker.rpartition(":")
        self.port = int(port)
        self.open = False
        self._server: asyncio.Server | None = None
        self.bound = 0

    async def __aenter__(self) -> BrokerGate:
        self._server = await asyncio.start_server(self._connection, HOST, 0)
        self.bound = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(self.host, self.port)
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class Lines(logging.Handler):
    """The router's log lines (its own and those of the outage account, popbridge.kafka), and an event set
    at each "router down" line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.down = asyncio.Condition()
        self.downs = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        if "router down" in record.getMessage():
            self.downs += 1
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.down:
            self.down.notify_all()

    async def wait_downs(self, count: int) -> None:
        async with self.down:
            await asyncio.wait_for(self.down.wait_for(lambda: self.downs >= count), 60)


@pytest.fixture
async def lines() -> AsyncIterator[Lines]:
    handler = Lines()
    loggers = [logging.getLogger(name) for name in ("popbridge.router", "popbridge.kafka")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.fixture
async def pipeline(kafka_bootstrap: str, kafka_topic_prefix: str, tmp_path: Path) -> Pipeline:
    created = Pipeline(kafka_bootstrap, kafka_topic_prefix, tmp_path / "popbridge.toml")
    await created.create_topics()
    return created


def supervisor(pipeline: Pipeline, settings: DeploymentSettings, tracker: ProgressTracker) -> Supervisor:
    return Supervisor(
        settings,
        pipeline.config,
        KafkaLog.from_settings(settings),
        tracker,
        Metrics(),
        asyncio.Event(),
        until_idle=True,
    )


async def test_started_while_kafka_is_down_the_router_waits_not_ready_and_routes_once_it_is_up(
    pipeline: Pipeline, lines: Lines
) -> None:
    events = [mail(n, message_id=n % 2 == 0) for n in range(20)]
    await pipeline.send_fetched(events)
    tracker = ProgressTracker()
    outage = CountedOutage(enough=3)
    async with BrokerGate(pipeline.settings.kafka_bootstrap or "") as gate:
        settings = DeploymentSettings(
            kafka_bootstrap=f"{HOST}:{gate.bound}",
            topic_prefix=pipeline.settings.topic_prefix,
            group_prefix=pipeline.settings.group_prefix,
        )
        run = supervisor(pipeline, settings, tracker)
        run.broker = outage
        running = asyncio.ensure_future(run.run())
        await lines.wait_downs(1)
        await asyncio.wait_for(outage.counted.wait(), 60)
        assert not tracker.ready
        gate.open = True
        await asyncio.wait_for(running, 120)

    assert {e.fetch_id for e in events} <= await pipeline.routed_fetch_ids()
    waiting = [line for line in lines.lines if "router down" in line]
    # Three failed starts within the outage account's minute: its first line only, then the app ran.
    assert len(waiting) == 1
    assert waiting[0].startswith("kafka: router down (")
    assert "KafkaConnectionError" in waiting[0]
    assert not outage.down  # the app's start ended the outage


class CountedOutage(BrokerOutage):
    """An outage account that says when it has counted `enough` failures."""

    def __init__(self, enough: int) -> None:
        super().__init__()
        self.enough = enough
        self.counted = asyncio.Event()

    def note_failure(self) -> str | None:
        verdict = super().note_failure()
        if self.outage.attempts >= self.enough:
            self.counted.set()
        return verdict


async def test_after_its_app_crashed_the_router_starts_a_fresh_one(
    pipeline: Pipeline, lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    apps: list[faust.App] = []
    started = asyncio.Event()

    def recording_create_app(*args: object, **kwargs: object) -> faust.App:
        app = create_app(*args, **kwargs)  # type: ignore[arg-type]  # passed through unchanged
        apps.append(app)
        started.set()
        return app

    monkeypatch.setattr(worker, "create_app", recording_create_app)  # the worker's name for it
    tracker = ProgressTracker()
    stop = asyncio.Event()
    run = Supervisor(
        pipeline.settings, pipeline.config, pipeline.log, tracker, Metrics(), stop, until_idle=False,
        broker=BrokerOutage(),  # not the process's: another test may have left it in an outage
    )
    running = asyncio.ensure_future(run.run())
    try:
        await asyncio.wait_for(started.wait(), 60)
        first = apps[0]
        await pipeline.send_fetched([mail(n, message_id=False) for n in range(10)])
        await pipeline.idle()
        await first.crash(
            CommitFailedError("Commit cannot be completed since the group has already rebalanced")
        )
        await lines.wait_downs(1)
        after = [mail(n, message_id=True) for n in range(10, 20)]
        await pipeline.send_fetched(after)
        await pipeline.idle()
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(running, 60)

    assert {e.fetch_id for e in after} <= await pipeline.routed_fetch_ids()
    # Other passing errors may come on the way (a topic just created is not described yet, the group
    # settles after the crash): each is one more line, and the router goes on.
    downs = [line for line in lines.lines if "router down" in line]
    crashes = [down for down in downs if down.startswith("router down (CommitFailedError: ")]
    assert crashes
    assert re.search(r"\); starting again in \d+ s$", crashes[0])
    assert len(apps) >= 2
    assert all("\n" not in down for down in downs)


async def test_two_routers_cold_started_at_once_route_everything(
    kafka_bootstrap: str, kafka_topic_prefix: str, tmp_path: Path
) -> None:
    pipeline = Pipeline(kafka_bootstrap, kafka_topic_prefix, tmp_path / "popbridge.toml")
    await pipeline.create_topics(internal=False)  # as after `topics create` of an older popbridge
    events = [mail(n, message_id=n % 3 != 0) for n in range(60)]
    await pipeline.send_fetched(events)
    tracker = ProgressTracker()

    await asyncio.wait_for(
        asyncio.gather(
            supervisor(pipeline, pipeline.settings, tracker).run(),
            supervisor(pipeline, pipeline.settings, tracker).run(),
        ),
        180,
    )

    assert {e.fetch_id for e in events} <= await pipeline.routed_fetch_ids()


async def test_a_router_killed_between_its_output_and_its_commit_loses_nothing(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    events = [mail(n, message_id=n % 2 == 0) for n in range(400)]  # more than it routes before the kill
    await pipeline.send_fetched(events)
    config = tmp_path / "popbridge.toml"  # written by the pipeline fixture
    watching = pipeline.log.consumer(pipeline.settings.group("watch"), [pipeline.settings.topic(ROUTED)])
    async with watching as watcher:
        first = await start_router_process(config, pipeline.settings)
        try:
            await asyncio.wait_for(first_output(watcher), 120)
        finally:
            first.kill()  # SIGKILL, as soon as an output is durable: its commit is at most a second later
            await first.wait()
    group, fetched = pipeline.settings.group("router"), pipeline.settings.topic(FETCHED)
    assert sum((await pipeline.log.committed(group, fetched)).values()) < len(events)  # killed mid-way

    log_path = tmp_path / "router-again.log"
    with log_path.open("wb") as output:
        again = await start_router_process(config, pipeline.settings, "--until-idle", output=output)
        try:
            await asyncio.wait_for(again.wait(), 180)
        except TimeoutError:
            pass
        finally:
            if again.returncode is None:  # not idle in time: no router is left behind
                again.kill()
                await again.wait()
    assert again.returncode == 0, log_path.read_text()[-5000:]

    assert {e.fetch_id for e in events} <= await pipeline.routed_fetch_ids()


async def first_output(watcher: KafkaConsumer) -> None:
    """Return as soon as the router's first output reaches the routed topic."""
    while not await watcher.fetch(timeout=1.0):
        pass
