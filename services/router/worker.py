"""`popbridge router`: runs the faust router app until stopped, or until caught up with --until-idle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import click

from schemas.topics import FETCHED
from services.router.app import create_app, internal_topics, repartition_topic
from services.runtime.connect import kafka_log
from services.runtime.health import LagWatch, ProgressTracker, serve_health
from services.runtime.idle import wait_until_idle
from services.runtime.metrics import Metrics
from services.runtime.pipeline_gauges import pipeline_watch
from services.runtime.settings import ConfigError, DeploymentSettings, MailConfig, load_config
from services.runtime.signals import stop_on_signals

log = logging.getLogger("popbridge.router")


async def run_router(settings: DeploymentSettings, config: MailConfig, *, until_idle: bool) -> None:
    """Start the app, wait for a signal (or for idleness), stop the app cleanly."""
    if not settings.kafka_bootstrap:
        raise ConfigError("environment: POPBRIDGE_KAFKA_BOOTSTRAP: the router service needs Kafka")
    kafka = kafka_log(settings)
    metrics, tracker = Metrics(), ProgressTracker()
    app = create_app(settings, config, metrics=metrics, security=kafka.security)
    # The lag watch counts moving commits as progress: a faust agent stalled after a rebalance (a known
    # faust failure) shows as lag without progress, /healthz fails, and Kubernetes restarts the pod.
    watch = None if until_idle else LagWatch.of(kafka, settings, "router")
    port = None if until_idle else settings.http_port or None
    gauges = contextlib.nullcontext() if until_idle else pipeline_watch(kafka, settings, metrics)
    async with serve_health(port, tracker, metrics, watch=watch), gauges:
        await kafka.ensure_topics(internal_topics(settings))
        await app.start()
        tracker.mark_ready()
        try:
            if until_idle:
                topics = [settings.topic(FETCHED), repartition_topic(settings)]
                await wait_until_idle(kafka, settings.group("router"), topics)
            else:
                await _wait_for_signal()
        finally:
            await app.stop()


async def _wait_for_signal() -> None:
    await stop_on_signals().wait()


@click.command()
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help="Mail config (TOML)."
)
@click.option("--until-idle", is_flag=True, help="Exit once every fetched message is routed and committed.")
@click.pass_obj
def router(obj: object, config_path: Path, until_idle: bool) -> None:
    """Route fetched messages to their local recipients (faust-streaming app)."""
    settings: DeploymentSettings = obj.settings  # type: ignore[attr-defined]  # services.cli.Context
    asyncio.run(run_router(settings, load_config(config_path), until_idle=until_idle))
