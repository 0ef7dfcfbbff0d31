"""`popbridge dlq list | show | retry`: the deliverer's dead letters, read and requeued by the operator.

What is read (services.ops.reader, no consumer group): the dead-letter topic within a time window
(`--since`, 7 days by default for `list`, everything kept for `show` and `retry`), or, for a full fetch
id, only the partition it is keyed to; then the delivered ledger from the oldest dead letter found on
(a retry delivers after the dead letter was written), to mark the copies delivered since. A retry writes
a RetryScheduled to the first retry tier. A log that refuses is one line and exit code 1; no answer
within `--timeout` seconds is one line and exit code 3 (services.ops.oneshot).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import click

from schemas.codec import encode
from schemas.events import DeliveryDeadLettered, RecipientDelivered, RetryScheduled
from schemas.topics import DEAD_LETTERS, DELIVERED, RETRY_TOPICS
from services.ops.actions import partitioner_of
from services.ops.commands import ops_log, since_option, window_of
from services.ops.dead_letters import (
    DeadLetter,
    describe,
    latest_dead_letters,
    list_json,
    listed,
    matching,
    plan_retry,
    retry_json,
    retry_text,
    summary,
)
from services.ops.locate import Partitioner, Window, key_reads, parse_since
from services.ops.oneshot import run_bounded, timeout_option
from services.ops.reader import decoded, keyed, partition_counts, windowed
from services.runtime.context import CommandContext, pass_command_context
from services.runtime.embedded import EmbeddedLog
from services.runtime.kafka import KafkaLog
from services.runtime.log import LogError, Outgoing, Record
from services.runtime.ops_log import OpsLog, RangeReader
from services.runtime.settings import DeploymentSettings

T = TypeVar("T")
LIST_SINCE = "7d"
FETCH_ID_LENGTH = 32  # schemas.events.fetch_id_for: a full one names the partition to read


def _bounded(work: Callable[[], Awaitable[T]], timeout: float, *, retry: bool = True) -> T:
    """A dlq command's talk to the log: at most `timeout` seconds (exit 3), a permanent error one line."""
    try:
        return run_bounded(work, timeout, retry=retry)
    except LogError as exc:
        raise click.ClickException(str(exc)) from None


async def dead_letters(
    log: OpsLog, settings: DeploymentSettings, window: Window, fetch_id: str | None = None
) -> list[DeadLetter]:
    """The dead letters appended within `window` (only `fetch_id`'s partition when given), latest record
    per (fetch id, recipient), oldest first, each marked when the ledger says it was delivered since."""
    async with log.reading() as reads:
        letters = await _letters(reads, partitioner_of(log), settings.topic(DEAD_LETTERS), window, fetch_id)
        if not letters:
            return []
        since = Window(min(ms for ms, _ in letters))
        ledger: list[Record] = [r async for r in windowed(reads, settings.topic(DELIVERED), since)]
    delivered = (event for _, event in decoded(ledger, (RecipientDelivered,)))
    return latest_dead_letters(letters, delivered)


async def _letters(
    log: RangeReader, partitioner: Partitioner, topic: str, window: Window, fetch_id: str | None
) -> list[tuple[int, DeliveryDeadLettered]]:
    """The dead-letter records within `window` (only `fetch_id`'s partition when given), with their times."""
    if fetch_id is None:
        records = [record async for record in windowed(log, topic, window)]
    else:
        counts = await partition_counts(log, [topic])
        records = [record for read in key_reads(fetch_id.encode(), counts, partitioner, window)
                   async for record in keyed(log, read)]
    return [(record.timestamp_ms, event) for record, event in decoded(records, (DeliveryDeadLettered,))]


def _read(
    context: CommandContext, since: datetime | None, letter_id: str | None, timeout: float
) -> tuple[KafkaLog | EmbeddedLog, list[DeadLetter]]:
    settings = context.settings
    log = ops_log(settings)
    fetch_id = letter_id if letter_id is not None and len(letter_id) >= FETCH_ID_LENGTH else None
    window = window_of(since, None)
    return log, _bounded(lambda: dead_letters(log, settings, window, fetch_id), timeout)


def _chosen(letters: list[DeadLetter], letter_id: str, recipient: str | None) -> list[DeadLetter]:
    found = matching(letters, letter_id, recipient)
    if not found:
        raise click.ClickException(f"no dead letter {letter_id}{f' for {recipient}' if recipient else ''}")
    return found


since_flag = click.option(
    "--since", metavar="WHEN", callback=since_option,
    help="Dead letters written since WHEN: a duration back (12h, 7d, 90d) or an ISO 8601 time.",
)


@click.group()
def dlq() -> None:
    """Dead letters: copies the deliverer gave up on. Nothing is ever bounced to the outside sender."""


@dlq.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also those delivered since by a retry.")
@click.option("--since", metavar="WHEN", default=LIST_SINCE, show_default=True,
              help="Dead letters written since WHEN: a duration back (12h, 7d, 90d) or an ISO 8601 time.")
@click.option("--recipient", help="Only the copies for this recipient.")
@click.option("--mailbox", help="Only the copies fetched from this mailbox (its id in the config).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of lines.")
@timeout_option
@pass_command_context
def dlq_list(
    context: CommandContext, *, show_all: bool, since: str, recipient: str | None, mailbox: str | None,
    as_json: bool, timeout: float,
) -> None:
    """One line per dead letter: id, when, status, recipient, server reply."""
    try:
        start = parse_since(since, datetime.now(UTC))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    _, letters = _read(context, start, None, timeout)
    shown = listed(letters, show_all=show_all, recipient=recipient, mailbox=mailbox)
    if as_json:
        click.echo(json.dumps(list_json(shown, start), indent=2))
        return
    for letter in shown:
        click.echo(summary(letter))


@dlq.command("show")
@click.argument("letter_id")
@click.option("--recipient", help="Only the copy for this recipient.")
@since_flag
@timeout_option
@pass_command_context
def dlq_show(
    context: CommandContext, letter_id: str, recipient: str | None, since: datetime | None, timeout: float
) -> None:
    """The details of a dead letter: why it failed, what the server said, which message it is."""
    _, letters = _read(context, since, letter_id, timeout)
    for letter in _chosen(letters, letter_id, recipient):
        click.echo(describe(letter))


@dlq.command("retry")
@click.argument("letter_id", required=False)
@click.option("--recipient", help="Only the copy for this recipient.")
@click.option("--all", "retry_all", is_flag=True, help="Every open dead letter (within --since).")
@click.option("--dry-run", is_flag=True, help="Show what would be re-queued; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (the plan, and whether done).")
@since_flag
@timeout_option
@pass_command_context
def dlq_retry(
    context: CommandContext, letter_id: str | None, recipient: str | None, *, retry_all: bool, dry_run: bool,
    as_json: bool, since: datetime | None, timeout: float,
) -> None:
    """Try dead letters again: they go back to the first retry tier, with a fresh maximum age.

    Acts at once (as it always has); --dry-run shows the plan only. Copies delivered since are left alone.
    """
    if not retry_all and not letter_id:
        raise click.UsageError("name a dead letter id, or use --all")
    log, letters = _read(context, since, None if retry_all else letter_id, timeout)
    if not retry_all:
        _chosen(letters, letter_id or "", recipient)
    plan = plan_retry(letters, None if retry_all else letter_id, None if retry_all else recipient)
    if not dry_run:
        _bounded(lambda: _requeue(log, context.settings, list(plan.requeue)), timeout, retry=False)
    executed = not dry_run
    if as_json:
        click.echo(json.dumps(retry_json(plan, executed=executed), indent=2))
    else:
        click.echo("\n".join(retry_text(plan, executed=executed)))


async def _requeue(
    log: KafkaLog | EmbeddedLog, settings: DeploymentSettings, letters: list[DeadLetter]
) -> int:
    if not letters:
        return 0
    now = datetime.now(UTC)
    topic = settings.topic(RETRY_TOPICS[0])
    records = [
        Outgoing(topic, encode(RetryScheduled(routed=d.event.routed, recipients=(d.event.recipient,),
                                              attempts=d.event.attempts, due_at=now, age_from=now,
                                              last_reply=d.event.smtp_text)),
                 d.event.routed.fetch_id.encode())
        for d in letters
    ]
    async with log.producer() as producer:
        await producer.send_all(records)
    return len(records)
