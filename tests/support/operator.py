"""The operator's side of the integration tests: the `popbridge` CLI run as an operator runs it, with a
deployment's POPBRIDGE_* environment, and events keyed by fetch id as the stages key them."""

from __future__ import annotations

import asyncio

from click.testing import CliRunner, Result

from schemas.events import DeliveryDeadLettered, RetryScheduled
from services.cli import cli
from services.runtime.settings import DeploymentSettings


def deployment_environ(settings: DeploymentSettings) -> dict[str, str]:
    """The POPBRIDGE_* variables that point a command at the deployment's log, topics and groups."""
    return {
        "POPBRIDGE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap or "",
        "POPBRIDGE_TOPIC_PREFIX": settings.topic_prefix,
        "POPBRIDGE_GROUP_PREFIX": settings.group_prefix,
        "POPBRIDGE_DATA_DIR": settings.data_dir,
    }


async def popbridge(settings: DeploymentSettings, *args: str) -> Result:
    """`popbridge ARGS...` against the deployment (in this process, off the event loop's thread)."""
    environ = deployment_environ(settings)
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=environ, catch_exceptions=False)


def fetch_id_of(event: object) -> str:
    """The fetch id an event is keyed by: its own, or for a retry or dead letter the routed event's."""
    if isinstance(event, DeliveryDeadLettered | RetryScheduled):
        return event.routed.fetch_id
    fetch_id: str = getattr(event, "fetch_id", "")
    return fetch_id
