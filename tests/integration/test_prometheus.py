"""A real Prometheus scrapes the three stages on the real broker and an embedded `popbridge run`, while mail
goes through them: every dashboard query returns series, and the lag alert (its threshold and duration
shortened) fires while the deliverer is stopped with mail waiting, and resolves once it is back.

The stages run in this process with the services' own parts (the fetcher loop, the faust router app,
the deliverer, the health server with its lag watch, the pipeline gauges), each serving /metrics on a
loopback port it bound itself; Prometheus is Debian's binary with its own config, data dir and port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.topics import FETCHED, TOPICS, TopicSpec
from services.deliverer.service import Deliverer
from services.deliverer.smtp import SmtpTransport
from services.fetcher.commands import run_fetcher
from services.router.app import create_app, internal_topics
from services.runtime.embedded import EmbeddedLog
from services.runtime.health import LagWatch, ProgressTracker, serve_health
from services.runtime.kafka import KafkaLog
from services.runtime.log import Outgoing
from services.runtime.metrics import Metrics
from services.runtime.pipeline_gauges import pipeline_watch
from services.runtime.settings import DeploymentSettings, MailConfig, load_config
from services.runtime.stages import stages_run_by
from services.single.run import Pipeline
from tests.deploy.monitoring import dashboard_queries, required_tool, rule_groups
from tests.support.dovecot import DovecotMailboxes, MailUser
from tests.support.mail_config import delivery_to, mailbox, write_mail_config
from tests.support.pipeline import sample_message
from tests.support.prometheus import Prometheus, eventually, running_prometheus
from tests.support.smtp import SmtpSink

pytestmark = pytest.mark.integration

WATCH = 0.5  # seconds between two lag reads: the services' 30 s, shortened for the test
LAG_ALERT = "PopbridgeConsumerLagHigh"
MAX_SIZE = 4000  # bytes; the oversized message is bigger


def message(n: int, size: int = 0) -> bytes:
    return sample_message(n, size=size, tag="prom")


def shortened_rules() -> dict[str, Any]:
    """The PrometheusRule's groups; the lag alert fires on any lag after 2 s (not 1000 for 15 min)."""
    groups = rule_groups()
    rules = [r for g in groups["groups"] for r in g["rules"]]
    lag = next(r for r in rules if r.get("alert") == LAG_ALERT)
    assert lag["expr"].endswith("> 1000")
    assert lag["for"] == "15m"
    lag["expr"], lag["for"] = lag["expr"].replace("> 1000", "> 0"), "2s"
    return groups


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def mailboxes(dovecot: DovecotMailboxes, user: MailUser, broken_port: int) -> list[dict[str, Any]]:
    """The user's mailbox (polled every second, a low size limit) and one whose server refuses connections."""
    good = mailbox("alice-box", dovecot.server.host, dovecot.server.pop3_port, user.login, poll_interval=1.0,
                   max_message_size=MAX_SIZE)
    broken = mailbox("broken-box", "127.0.0.1", broken_port, "nobody", poll_interval=1.0, timeout=2.0)
    return [good, broken]


@contextlib.asynccontextmanager
async def fetcher(log: KafkaLog, settings: DeploymentSettings, config: MailConfig,
                  environ: dict[str, str]) -> AsyncIterator[int]:
    metrics, tracker = Metrics(), ProgressTracker()
    async with serve_health(0, tracker, metrics, host="127.0.0.1") as server, \
            pipeline_watch(log, settings, metrics, interval=WATCH):
        task = asyncio.create_task(run_fetcher(log, settings, config, environ, once=False, metrics=metrics,
                                               tracker=tracker))
        try:
            assert server.port is not None
            yield server.port
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def router(log: KafkaLog, settings: DeploymentSettings, config: MailConfig) -> AsyncIterator[int]:
    metrics, tracker = Metrics(), ProgressTracker()
    app = create_app(settings, config, metrics=metrics)
    watch = LagWatch(log, stages_run_by(settings, "router"), WATCH)
    async with serve_health(0, tracker, metrics, watch=watch, host="127.0.0.1") as server, \
            pipeline_watch(log, settings, metrics, interval=WATCH):
        await log.ensure_topics(internal_topics(settings))
        await app.start()
        try:
            assert server.port is not None
            yield server.port
        finally:
            await app.stop()


@contextlib.asynccontextmanager
async def deliverer(log: KafkaLog, settings: DeploymentSettings, config: MailConfig) -> AsyncIterator[int]:
    metrics, tracker, stop = Metrics(), ProgressTracker(), asyncio.Event()
    watch = LagWatch(log, stages_run_by(settings, "deliverer"), WATCH)
    async with SmtpTransport(config.delivery, None) as transport, \
            serve_health(0, tracker, metrics, watch=watch, host="127.0.0.1") as server, \
            pipeline_watch(log, settings, metrics, interval=WATCH):
        stage = Deliverer(log, settings, transport, metrics=metrics, poll_seconds=0.2)
        task = asyncio.create_task(stage.run(stop=stop))
        try:
            assert server.port is not None
            yield server.port
        finally:
            stop.set()
            await task


@contextlib.asynccontextmanager
async def embedded_run(directory: Path, config: MailConfig, environ: dict[str, str]) -> AsyncIterator[int]:
    settings = DeploymentSettings(data_dir=str(directory))
    pipeline = Pipeline(EmbeddedLog(directory), settings, config, environ, poll_seconds=0.2, health_port=0,
                        watch_interval=WATCH)
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(until_idle=False, stop=stop))
    try:
        await pipeline.serving.wait()
        assert pipeline.health is not None
        assert pipeline.health.port is not None
        yield pipeline.health.port
    finally:
        stop.set()
        await task


def config_for(path: Path, smtp_sink: SmtpSink, boxes: list[dict[str, Any]]) -> MailConfig:
    return load_config(write_mail_config(path, delivery=delivery_to(smtp_sink.port), mailboxes=boxes))


async def series_of(prometheus: Prometheus, expr: str) -> list[dict[str, Any]]:
    return await prometheus.query(expr)


async def test_dashboard_queries_return_series_and_the_lag_alert_fires_and_resolves(
    kafka_bootstrap: str,
    kafka_topic_prefix: str,
    dovecot: DovecotMailboxes,
    smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    required_tool("prometheus")
    kafka_user, run_user = dovecot.new_user("alice"), dovecot.new_user("alice")
    dovecot.deliver_many(kafka_user, [message(1), message(2), message(3), message(4, size=2 * MAX_SIZE)])
    dovecot.deliver_many(run_user, [message(11), message(12)])
    settings = DeploymentSettings(kafka_bootstrap=kafka_bootstrap, topic_prefix=kafka_topic_prefix,
                                  group_prefix=kafka_topic_prefix + "g")
    log = KafkaLog(kafka_bootstrap)
    await log.ensure_topics([TopicSpec(settings.topic(s.name), s.partitions, s.config) for s in TOPICS])
    async with log.producer() as producer:  # a record that is no event: the router skips (and counts) it
        await producer.send_all([Outgoing(settings.topic(FETCHED), b"not an event", key=b"junk")])

    with refused_port() as broken, running_prometheus(tmp_path / "prom", shortened_rules()) as prometheus:
        kafka_config = config_for(tmp_path / "kafka.toml", smtp_sink, mailboxes(dovecot, kafka_user, broken))
        run_config = config_for(tmp_path / "run.toml", smtp_sink, mailboxes(dovecot, run_user, broken))
        kafka_env, run_env = {"POP3_PASSWORD": kafka_user.password}, {"POP3_PASSWORD": run_user.password}
        (tmp_path / "embedded").mkdir()
        async with contextlib.AsyncExitStack() as stages:
            targets = {
                "fetcher": await stages.enter_async_context(fetcher(log, settings, kafka_config, kafka_env)),
                "router": await stages.enter_async_context(router(log, settings, kafka_config)),
                "run": await stages.enter_async_context(
                    embedded_run(tmp_path / "embedded", run_config, run_env)
                ),
            }
            async with deliverer(log, settings, kafka_config) as port:
                prometheus.set_targets({**targets, "deliverer": port})
                await asyncio.to_thread(smtp_sink.wait_for, 5, 120)

                # Every panel's query returns series from the running pipeline.
                for title, expr in dashboard_queries({"$__rate_interval": "30s"}).items():
                    await eventually(lambda expr=expr: series_of(prometheus, expr), f"{title}: {expr}")
                skipped = await series_of(prometheus, 'popbridge_records_skipped_total{stage="router"}')
                assert [float(s["value"][1]) for s in skipped] == [1.0]
                # Drained, nothing fires (under load the 2 s rule may fire for a moment while mail flows).
                await eventually(lambda: _none_firing(prometheus), "no lag alert once drained")

            # The deliverer stops; new mail is fetched and routed and waits for it: the alert fires,
            # although the deliverer itself exports nothing now (the other stages report its lag).
            prometheus.set_targets(targets)
            dovecot.deliver_many(kafka_user, [message(5), message(6)])
            # (The router's alert may fire for a moment too: the shortened rule fires after 2 s of any lag,
            # and routing the new mail can take that long on a loaded machine. It is the deliverer's we
            # wait for, and it must stay the only one once the router caught up.)
            await eventually(lambda: _firing_for(prometheus, "deliverer"), "the lag alert fires", timeout=90)
            await eventually(lambda: _firing_only_for(prometheus, "deliverer"), "only for the deliverer")
            assert len(smtp_sink.messages) == 5  # nothing was delivered meanwhile

            async with deliverer(log, settings, kafka_config) as port:
                prometheus.set_targets({**targets, "deliverer": port})
                await asyncio.to_thread(smtp_sink.wait_for, 7, 120)
                await eventually(lambda: _none_firing(prometheus), "the lag alert resolves", timeout=90)


async def _firing_for(prometheus: Prometheus, stage: str) -> bool:
    return stage in {labels["stage"] for labels in await prometheus.firing(LAG_ALERT)}


async def _firing_only_for(prometheus: Prometheus, stage: str) -> bool:
    return [labels["stage"] for labels in await prometheus.firing(LAG_ALERT)] == [stage]


async def _none_firing(prometheus: Prometheus) -> bool:
    return await prometheus.firing(LAG_ALERT) == []
