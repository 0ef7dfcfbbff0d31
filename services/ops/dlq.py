"""`popbridge dlq list | show | retry`: the deliverer's dead letters, read and requeued by the operator.

The dead-letter and delivered topics are read with services.ops.reader (no consumer group); a retry
writes a RetryScheduled to the first retry tier. A log that refuses is one line and exit code 1; no answer
within `--timeout` seconds is one line and exit code 3 (services.ops.oneshot).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar, cast

import click

from schemas.codec import encode
from schemas.events import DeliveryDeadLettered, Event, RecipientDelivered, RetryScheduled
from schemas.topics import DEAD_LETTERS, DELIVERED, RETRY_TOPICS
from services.ops.commands import ops_log
from services.ops.dead_letters import DeadLetter, describe, latest_dead_letters, matching, summary
from services.ops.oneshot import gather_or_raise, run_bounded, timeout_option
from services.ops.reader import events
from services.runtime.context import CommandContext, pass_command_context
from services.runtime.embedded import EmbeddedLog
from services.runtime.kafka import KafkaLog
from services.runtime.log import LogError, Outgoing
from services.runtime.ops_log import OpsLog
from services.runtime.settings import DeploymentSettings

T = TypeVar("T")
E = TypeVar("E", bound=Event)


def _bounded(work: Callable[[], Awaitable[T]], timeout: float, *, retry: bool = True) -> T:
    """A dlq command's talk to the log: at most `timeout` seconds (exit 3), a permanent error one line."""
    try:
        return run_bounded(work, timeout, retry=retry)
    except LogError as exc:
        raise click.ClickException(str(exc)) from None


async def dead_letters(log: OpsLog, settings: DeploymentSettings) -> list[DeadLetter]:
    """Every dead letter on the topic, latest record per (fetch id, recipient), oldest first."""
    letters = _all(log, settings.topic(DEAD_LETTERS), DeliveryDeadLettered)
    delivered = _all(log, settings.topic(DELIVERED), RecipientDelivered)
    both: list[object] = await gather_or_raise(letters, delivered)
    read_letters = cast(list[tuple[int, DeliveryDeadLettered]], both[0])
    read_delivered = cast(list[tuple[int, RecipientDelivered]], both[1])
    return latest_dead_letters(read_letters, (event for _, event in read_delivered))


async def _all(log: OpsLog, topic: str, wanted: type[E]) -> list[tuple[int, E]]:
    return [(record.timestamp_ms, event) async for record, event in events(log, topic, (wanted,))]


def _chosen(letters: list[DeadLetter], letter_id: str, recipient: str | None) -> list[DeadLetter]:
    found = matching(letters, letter_id, recipient)
    if not found:
        raise click.ClickException(f"no dead letter {letter_id}{f' for {recipient}' if recipient else ''}")
    return found


@click.group()
def dlq() -> None:
    """Dead letters: copies the deliverer gave up on. Nothing is ever bounced to the outside sender."""


@dlq.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also those delivered since by a retry.")
@timeout_option
@pass_command_context
def dlq_list(context: CommandContext, show_all: bool, timeout: float) -> None:
    """One line per dead letter: id, when, recipient, server reply."""
    settings = context.settings
    letters = _bounded(lambda: dead_letters(ops_log(settings), settings), timeout)
    for letter in letters:
        if show_all or not letter.delivered_since:
            click.echo(summary(letter))


@dlq.command("show")
@click.argument("letter_id")
@click.option("--recipient", help="Only the copy for this recipient.")
@timeout_option
@pass_command_context
def dlq_show(context: CommandContext, letter_id: str, recipient: str | None, timeout: float) -> None:
    """The details of a dead letter: why it failed, what the server said, which message it is."""
    settings = context.settings
    letters = _bounded(lambda: dead_letters(ops_log(settings), settings), timeout)
    for letter in _chosen(letters, letter_id, recipient):
        click.echo(describe(letter))


@dlq.command("retry")
@click.argument("letter_id", required=False)
@click.option("--recipient", help="Only the copy for this recipient.")
@click.option("--all", "retry_all", is_flag=True, help="Every open dead letter.")
@timeout_option
@pass_command_context
def dlq_retry(
    context: CommandContext, letter_id: str | None, recipient: str | None, retry_all: bool, timeout: float
) -> None:
    """Try dead letters again: they go back to the first retry tier, with a fresh maximum age."""
    if not retry_all and not letter_id:
        raise click.UsageError("name a dead letter id, or use --all")
    settings = context.settings
    log = ops_log(settings)
    letters = _bounded(lambda: dead_letters(log, settings), timeout)
    chosen = letters if retry_all else _chosen(letters, letter_id or "", recipient)
    open_letters = [d for d in chosen if not d.delivered_since]
    count = _bounded(lambda: _requeue(log, settings, open_letters), timeout, retry=False)
    click.echo(f"dlq: {count} copies queued for retry")


async def _requeue(
    log: KafkaLog | EmbeddedLog, settings: DeploymentSettings, letters: list[DeadLetter]
) -> int:
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
