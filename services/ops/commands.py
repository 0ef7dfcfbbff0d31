"""`popbridge lag`, `popbridge replay` (with `--shadow`) and `popbridge trace`: thin click commands.

Exit codes: 0 fine; 1 a replay is refused, nothing was found to trace, or the log refuses (a permanent
error); 2 a usage or configuration mistake; 3 the log cannot be reached within `--timeout` seconds
(services.ops.oneshot). `lag` has its own check-runner contract (its docstring).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import click

from services.ops.actions import collect_trace, copy_window, execute_replay, plan_replay, plan_window
from services.ops.lag import UNKNOWN, Thresholds, lag_json, lag_status, lag_text
from services.ops.locate import Window, parse_since
from services.ops.oneshot import run_bounded, timeout_option
from services.ops.replay import ResetPlan, parse_time, plan_text, to_ms, window_text
from services.ops.shadow import report_text, shadow_replay
from services.ops.trace import is_message_id, trace_json, trace_text
from services.runtime.connect import open_log
from services.runtime.context import CommandContext, Reroute, pass_command_context
from services.runtime.embedded import EmbeddedLog
from services.runtime.gathering import gather_or_raise
from services.runtime.kafka import KafkaLog
from services.runtime.lag import StageLag
from services.runtime.log import LogError
from services.runtime.ops_log import OpsLog, stage_lag
from services.runtime.settings import DeploymentSettings, load_config
from services.runtime.stages import Stage, declared_stages


def ops_log(settings: DeploymentSettings) -> KafkaLog | EmbeddedLog:
    """The deployment's log (services.runtime.connect) with its admin operations."""
    log = open_log(settings)
    if not isinstance(log, KafkaLog | EmbeddedLog):
        raise TypeError(f"{log!r} has no admin operations for the ops commands")
    return log


def fail(message: str) -> NoReturn:
    """One line on stderr and exit code 1: an operational refusal or failure, never a traceback."""
    click.echo(f"popbridge: {message}", err=True)
    raise SystemExit(1)


def time_option(_: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """click callback: an ISO 8601 time (UTC unless it names a zone)."""
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


# --- lag -------------------------------------------------------------------------------------------


async def gather_lag(log: OpsLog, stages: Sequence[Stage], now: datetime) -> list[StageLag]:
    return await gather_or_raise(*(stage_lag(log, stage, now) for stage in stages))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of the table.")
@click.option("--max-lag", type=click.IntRange(min=0), metavar="N",
              help="Warning (exit 1) when a stage's total lag exceeds N messages.")
@click.option("--max-age", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Warning (exit 1) when a stage's oldest unprocessed message is older than SECONDS.")
@click.option("--critical-lag", type=click.IntRange(min=0), metavar="N",
              help="Critical (exit 2) when a stage's total lag exceeds N messages.")
@click.option("--critical-age", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Critical (exit 2) when a stage's oldest unprocessed message is older than SECONDS.")
@click.option("--stage", "only", multiple=True, metavar="STAGE", help="Only this stage (repeatable).")
@timeout_option
@pass_command_context
def lag(
    context: CommandContext, *, as_json: bool, max_lag: int | None, max_age: float | None,
    critical_lag: int | None, critical_age: float | None, only: tuple[str, ...], timeout: float,
) -> None:
    """Per stage and partition: committed offset, end offset, lag and the oldest unprocessed message's age.

    Retry tiers (deliverer-retry-N) are listed too; their records wait on purpose, so no threshold
    applies to them. Exit codes, whatever the flags (a check runner's convention): 0 every stage within
    the limits given (or none given), 1 a --max-* limit exceeded, 2 a --critical-* limit exceeded, 3 the
    log could not be read (unreachable within --timeout, or this user refused).
    """
    settings = context.settings
    stages = _select(declared_stages(settings), only)
    now = datetime.now(UTC)
    try:
        reports = run_bounded(lambda: gather_lag(ops_log(settings), stages, now), timeout)
    except LogError as exc:
        click.echo(f"popbridge: {exc}", err=True)
        raise SystemExit(UNKNOWN) from None
    limits = Thresholds(max_lag, max_age, critical_lag, critical_age)
    if as_json:
        click.echo(json.dumps(lag_json(reports, limits, now), indent=2))
    else:
        click.echo("\n".join(lag_text(reports, limits)))
    raise SystemExit(lag_status(reports, limits))


def _select(stages: Sequence[Stage], only: Sequence[str]) -> list[Stage]:
    names = [s.name for s in stages]
    unknown = [name for name in only if name not in names]
    if unknown:
        message = f"unknown stage {unknown[0]!r} (one of {', '.join(names)})"
        raise click.BadParameter(message, param_hint="--stage")
    return [s for s in stages if not only or s.name in only]


# --- replay ----------------------------------------------------------------------------------------


@click.command()
@click.argument("stage_name", metavar="STAGE")
@click.option("--from", "since", required=True, metavar="TIME", callback=time_option,
              help="ISO 8601 time, UTC unless a zone is given (2026-11-27T08:00, ...+01:00).")
@click.option("--to", "until", metavar="TIME", callback=time_option,
              help="End of a window (excluded): copy the input records of [--from, --to) to the end of the "
                   "input topic, so the running stage processes them again; the group is not touched.")
@click.option("--execute", is_flag=True,
              help="Reset the group, or with --to copy the window (default: a dry run that changes nothing).")
@click.option("--shadow", is_flag=True,
              help="router only: re-route the window with the current rules into a shadow topic and list the "
                   "messages that would go to different recipients; changes nothing for users.")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="Mail config (TOML), for --shadow.")
@timeout_option
@pass_command_context
def replay(
    context: CommandContext, *, stage_name: str, since: datetime, until: datetime | None, execute: bool,
    shadow: bool, config_path: Path | None, timeout: float,
) -> None:
    """Have STAGE process its input again from --from.

    \b
    Without --to: rewind STAGE's consumer group to the first records at or after --from, like
      `kafka-consumer-groups --reset-offsets --to-datetime`; the stage must be stopped for --execute.
    With --to: re-publish the input records of [--from, --to) (same key and value) to the same input
      topic while the stage keeps running; the deliverer's ledger keeps a recipient from a second copy.
    """
    settings = context.settings
    stage = _replayable(settings, stage_name)
    if until is not None and until <= since:
        raise click.BadParameter("--to must be later than --from", param_hint="--to")
    if shadow:
        _shadow(context, stage, since, until, execute=execute, config=config_path)
    elif until is not None:
        _replay_window(settings, stage, since, until, execute=execute, timeout=timeout)
    else:
        _replay_from(settings, stage, since, execute=execute, timeout=timeout)


def _replay_from(
    settings: DeploymentSettings, stage: Stage, since: datetime, *, execute: bool, timeout: float
) -> None:
    """The group reset: plan, and with `execute` apply it unless the group has live members."""
    try:
        plan, members = run_bounded(lambda: _plan(ops_log(settings), stage, since), timeout)
    except LogError as exc:
        fail(str(exc))
    click.echo("\n".join(plan_text(plan)))
    if not execute:
        active = f"; the group has {len(members)} active member(s): stop the {stage.name} first"
        click.echo(f"dry run: nothing changed; add --execute to apply{active if members else ''}")
        return
    if members:
        fail(f"refusing to replay: the group {stage.group!r} has {len(members)} active member(s) "
             f"({', '.join(sorted(members))}); stop the {stage.name} and try again")
    try:
        applied = run_bounded(lambda: execute_replay(ops_log(settings), plan), timeout)
    except LogError as exc:
        fail(f"replay not applied: {exc}")
    moved = ", ".join(f"{tp.partition}->{offset}" for tp, offset in applied.items())
    click.echo(f"applied: group {plan.group} on {stage.replay_topic} now at {moved or 'nothing to move'}")


async def _plan(log: OpsLog, stage: Stage, since: datetime) -> tuple[ResetPlan, list[str]]:
    members = await log.active_members(stage.group)
    return await plan_replay(log, stage, since), [m.client for m in members]


def _replay_window(
    settings: DeploymentSettings, stage: Stage, since: datetime, until: datetime, *, execute: bool,
    timeout: float,
) -> None:
    """The window copy: plan, and with `execute` copy exactly the window the plan printed."""
    try:
        plan = run_bounded(lambda: plan_window(ops_log(settings), stage, since, until), timeout)
    except LogError as exc:
        fail(str(exc))
    click.echo("\n".join(window_text(plan)))
    if not execute:
        click.echo("dry run: nothing copied; add --execute to copy")
        return
    try:
        copied = run_bounded(lambda: copy_window(ops_log(settings), plan), timeout, retry=False)
    except LogError as exc:
        fail(f"window not (fully) copied: {exc}")
    per_partition = ", ".join(f"{partition}: {count}" for partition, count in copied.items())
    click.echo(f"copied: {sum(copied.values())} record(s) to {plan.topic} ({per_partition or 'none'})")


def _replayable(settings: DeploymentSettings, name: str) -> Stage:
    stages = [s for s in declared_stages(settings) if not s.waits]
    for stage in stages:
        if stage.name == name:
            return stage
    names = ", ".join(s.name for s in stages)
    raise click.BadParameter(f"unknown stage {name!r} (one of {names})", param_hint="STAGE")


def _shadow(
    context: CommandContext, stage: Stage, since: datetime, until: datetime | None, *, execute: bool,
    config: Path | None,
) -> None:
    """Re-route the window into the shadow topic with the current rules and list what would change."""
    if stage.name != "router":
        raise click.BadParameter("--shadow replays the router only", param_hint="STAGE")
    if execute:
        raise click.BadParameter("--shadow changes nothing: drop --execute", param_hint="--execute")
    if config is None:
        raise click.BadParameter("--shadow needs the mail configuration file", param_hint="--config")
    reroute = _reroute_of(context)
    settings, mail = context.settings, load_config(config)
    try:  # not bounded by --timeout: the run reads the whole routed topic (services.ops.shadow)
        run = shadow_replay(ops_log(settings), settings, mail, reroute, since=since, until=until)
        report = asyncio.run(run)
    except LogError as exc:
        fail(str(exc))
    click.echo("\n".join(report_text(report, since, until)))


def _reroute_of(context: CommandContext) -> Reroute:
    if context.reroute is None:
        raise click.UsageError("--shadow needs the router's decision function (run it as `popbridge replay`)")
    return context.reroute


# --- trace -----------------------------------------------------------------------------------------

# A Message-ID the router's by-message-id topic does not name is looked for on the routed topic, every
# partition: by default over the by-message-id topic's retention and the dedupe window.
MESSAGE_ID_SINCE = "7d"


def since_option(_: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """click callback: a duration back from now (7d, 12h) or an ISO 8601 time."""
    if value is None:
        return None
    try:
        return parse_since(value, datetime.now(UTC))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def window_of(since: datetime | None, until: datetime | None) -> Window:
    return Window(None if since is None else to_ms(since), None if until is None else to_ms(until))


@click.command()
@click.argument("ident", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of the timeline.")
@click.option("--since", metavar="WHEN", callback=since_option,
              help="Only records appended since WHEN: a duration back (30m, 12h, 7d) or an ISO 8601 time. "
                   f"Default: everything kept for a fetch id, {MESSAGE_ID_SINCE} for a Message-ID.")
@click.option("--until", metavar="TIME", callback=since_option, help="Only records appended before TIME.")
@timeout_option
@pass_command_context
def trace(
    context: CommandContext, ident: str, *, as_json: bool, since: datetime | None, until: datetime | None,
    timeout: float,
) -> None:
    """The timeline of one message across the topics; ID is a fetch id or a Message-ID (it has an @).

    Reads one partition per topic (the fetch id is every event's key): the fetched records newest first
    down to the message's, the others from its fetch to 7 days after it (--until to look further). A
    Message-ID is looked up on the router's by-message-id topic (one partition), else on the routed
    topic since --since.
    """
    settings = context.settings
    if since is None and is_message_id(ident):
        since = parse_since(MESSAGE_ID_SINCE, datetime.now(UTC))
    window = window_of(since, until)
    try:
        found = run_bounded(lambda: collect_trace(ops_log(settings), settings, ident, window), timeout)
    except LogError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(trace_json(ident, found, since, until), indent=2))
    else:
        click.echo("\n".join(trace_text(ident, found, since)))
    if not found:
        raise SystemExit(1)
