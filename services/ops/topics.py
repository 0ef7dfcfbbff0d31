"""`popbridge topics`: create and list the topics of schemas.topics on the configured log."""

from __future__ import annotations

import click

from schemas.topics import TOPICS, TopicSpec
from services.ops.oneshot import run_bounded, timeout_option
from services.runtime.connect import kafka_log
from services.runtime.context import CommandContext, pass_command_context
from services.runtime.log import LogError
from services.runtime.settings import ConfigError, DeploymentSettings
from services.runtime.stages import router_internal_topics


def deployed_specs(settings: DeploymentSettings) -> list[TopicSpec]:
    """schemas.topics with this deployment's topic prefix applied, and the faust router's own topics
    (they must exist before the first router starts)."""
    specs = [TopicSpec(settings.topic(s.name), s.partitions, dict(s.config)) for s in TOPICS]
    return [*specs, *router_internal_topics(settings)]


@click.group()
def topics() -> None:
    """Manage popbridge's Kafka topics."""


@topics.command("create")
@timeout_option
@pass_command_context
def create(context: CommandContext, timeout: float) -> None:
    """Create every topic with its partition count and settings (existing topics are left alone)."""
    settings = context.settings
    if not settings.kafka_bootstrap:
        raise ConfigError("environment: POPBRIDGE_KAFKA_BOOTSTRAP is not set")
    specs = deployed_specs(settings)
    log = kafka_log(settings)
    try:
        created = run_bounded(lambda: log.ensure_topics(specs), timeout)
    except LogError as exc:  # permanent: a refused login, a refused topic setting
        raise click.ClickException(str(exc)) from None
    for spec in specs:
        state = "created" if spec.name in created else "exists"
        settings_text = " ".join(f"{k}={v}" for k, v in sorted(spec.config.items()))
        click.echo(f"{state:8} {spec.name} partitions={spec.partitions} {settings_text}")


@topics.command("list")
def list_() -> None:
    """Print the topics popbridge uses, with their settings."""
    for spec in TOPICS:
        click.echo(
            f"{spec.name} partitions={spec.partitions} "
            + " ".join(f"{k}={v}" for k, v in sorted(spec.config.items()))
        )
