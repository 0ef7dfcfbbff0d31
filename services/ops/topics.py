"""`popbridge topics`: create and list the topics of schemas.topics on the configured log.

`topics create` keeps its documented behaviour (it creates what is missing; existing topics are left
alone, as the deploy Job relies on), and is built as every operator command is: a pure planner
(`plan_topics`: which topics would be created, which exist), an executor (the log's `ensure_topics`),
and a thin command. `--dry-run` prints the plan without creating anything; `--json` prints it (or
what was done) for scripts. Exit codes: 0 ok, 2 configuration, 3 the log did not answer in `--timeout`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import click

from schemas.topics import TOPICS, TopicSpec
from services.ops.oneshot import run_bounded, timeout_option
from services.runtime.connect import kafka_log
from services.runtime.context import CommandContext, pass_command_context
from services.runtime.gathering import gather_or_raise
from services.runtime.kafka import KafkaLog
from services.runtime.log import LogError
from services.runtime.settings import ConfigError, DeploymentSettings
from services.runtime.stages import router_internal_topics

Action = Literal["create", "exists", "created"]


def deployed_specs(settings: DeploymentSettings) -> list[TopicSpec]:
    """schemas.topics with this deployment's topic prefix applied, and the faust router's own topics
    (they must exist before the first router starts)."""
    specs = [TopicSpec(settings.topic(s.name), s.partitions, dict(s.config)) for s in TOPICS]
    return [*specs, *router_internal_topics(settings)]


@dataclass(frozen=True)
class TopicStep:
    """What `topics create` does (or did) about one declared topic; `found` is the partition count of
    the topic already there (None: missing). An existing topic is never changed, even when it differs."""

    spec: TopicSpec
    action: Action
    found: int | None = None


def plan_topics(specs: Sequence[TopicSpec], existing: Mapping[str, int]) -> list[TopicStep]:
    """Pure: "create" for each spec not in `existing` (topic name -> partitions), else "exists"."""
    return [
        TopicStep(s, "exists", existing[s.name]) if s.name in existing else TopicStep(s, "create")
        for s in specs
    ]


def executed(plan: Sequence[TopicStep], created: Sequence[str]) -> list[TopicStep]:
    """The plan after `ensure_topics` ran: what it created says "created" (another creator may have been
    faster, then the topic "exists")."""
    return [TopicStep(s.spec, "created" if s.spec.name in created else "exists", s.found) for s in plan]


def step_line(step: TopicStep) -> str:
    settings_text = " ".join(f"{k}={v}" for k, v in sorted(step.spec.config.items()))
    differs = "" if step.found in (None, step.spec.partitions) else f" (found with {step.found} partitions)"
    return f"{step.action:8} {step.spec.name} partitions={step.spec.partitions} {settings_text}{differs}"


def plan_json(plan: Sequence[TopicStep], *, dry_run: bool) -> dict[str, Any]:
    """The machine-readable form of `topics create --json`."""
    return {
        "dry_run": dry_run,
        "topics": [
            {"name": s.spec.name, "action": s.action, "partitions": s.spec.partitions,
             "found_partitions": s.found, "config": dict(sorted(s.spec.config.items()))}
            for s in plan
        ],
    }  # fmt: skip


async def existing_partitions(log: KafkaLog, specs: Sequence[TopicSpec]) -> dict[str, int]:
    """Topic name -> partition count, for the specs' topics that exist."""
    counts = await gather_or_raise(*(log.partitions(s.name) for s in specs))
    return {spec.name: len(found) for spec, found in zip(specs, counts, strict=True) if found}


async def apply(log: KafkaLog, specs: Sequence[TopicSpec], *, dry_run: bool) -> list[TopicStep]:
    """Plan, and unless `dry_run` create what is missing; the steps as done (or as planned)."""
    plan = plan_topics(specs, await existing_partitions(log, specs))
    if dry_run:
        return plan
    return executed(plan, await log.ensure_topics([s.spec for s in plan if s.action == "create"]))


@click.group()
def topics() -> None:
    """Manage popbridge's Kafka topics."""


@topics.command("create")
@click.option("--dry-run", is_flag=True, help="Print what would be created; create nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (or what was done) as JSON.")
@timeout_option
@pass_command_context
def create(context: CommandContext, dry_run: bool, as_json: bool, timeout: float) -> None:
    """Create every topic with its partition count and settings (existing topics are left alone)."""
    settings = context.settings
    if not settings.kafka_bootstrap:
        raise ConfigError("environment: POPBRIDGE_KAFKA_BOOTSTRAP is not set")
    specs = deployed_specs(settings)
    log = kafka_log(settings)
    try:
        steps = run_bounded(lambda: apply(log, specs, dry_run=dry_run), timeout)
    except LogError as exc:  # permanent: a refused login, a refused topic setting
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(plan_json(steps, dry_run=dry_run), indent=2))
        return
    for step in steps:
        click.echo(step_line(step))


@topics.command("list")
def list_() -> None:
    """Print the topics popbridge uses, with their settings."""
    for spec in TOPICS:
        click.echo(
            f"{spec.name} partitions={spec.partitions} "
            + " ".join(f"{k}={v}" for k, v in sorted(spec.config.items()))
        )
