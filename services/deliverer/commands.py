"""`popbridge deliverer` (the delivery stage) and `popbridge dlq list | show | retry` (its dead letters).

Both take the deployment settings from the typed command context (services.runtime.context, set by
services.cli) and open the log with services.runtime.connect.open_log. A config mistake raises
ConfigError (one line, exit code 2); a log that refuses is one line and exit code 1. The `dlq` commands
give up after `--timeout` seconds without an answer (one line, exit code 3: services.runtime.oneshot);
the `deliverer` waits for the broker instead. The SMTP password is read here, from `password_env` or
`password_file`, and goes nowhere but the AUTH command; an XOAUTH2 token is read by the source built
here, afresh for every session.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any, TypeVar

import click

from schemas.codec import encode
from schemas.events import DeliveryDeadLettered, RecipientDelivered, RetryScheduled
from schemas.topics import DEAD_LETTERS, DELIVERED, RETRY_TOPICS
from services.deliverer.ledger import decode_record, ledger_key, read_to_end
from services.deliverer.retry import RetryPolicy
from services.deliverer.service import Counts, Deliverer
from services.deliverer.smtp import SmtpTransport, TokenSource
from services.runtime.broker_wait import broker_ready
from services.runtime.connect import open_log
from services.runtime.context import CommandContext, pass_command_context
from services.runtime.embedded import EmbeddedLog
from services.runtime.health import LagWatch, ProgressTracker, serve_health
from services.runtime.kafka import KafkaLog
from services.runtime.log import Log, LogError, Outgoing
from services.runtime.metrics import Metrics
from services.runtime.oneshot import run_bounded, timeout_option
from services.runtime.pipeline_gauges import pipeline_watch
from services.runtime.secrets import read_secret, read_token
from services.runtime.settings import DeploymentSettings, MailConfig, SmtpTarget, load_config
from services.runtime.signals import stop_on_signals

T = TypeVar("T")


def smtp_password(target: SmtpTarget, environ: Mapping[str, str]) -> str | None:
    """The referenced SMTP password, when the target authenticates; ConfigError names the reference."""
    if target.auth == "xoauth2" or not (target.username or target.password_env or target.password_file):
        return None
    return read_secret(env=target.password_env, file=target.password_file, environ=environ, what="delivery")


def smtp_token(target: SmtpTarget, environ: Mapping[str, str]) -> TokenSource | None:
    """The bearer token source of an XOAUTH2 target, read afresh for every session; else None."""
    if target.auth != "xoauth2":
        return None

    async def token() -> str:
        return await read_token(env=target.token_env, file=target.token_file, command=target.token_command,
                                environ=environ, what="delivery", timeout=target.timeout)

    return token


def notice_address(config: MailConfig) -> str | None:
    """The postmaster who hears of dead letters (`notify_postmaster`), or None."""
    return config.postmaster if config.delivery.notify_postmaster else None


def _run(coroutine: Any) -> Any:
    try:
        return asyncio.run(coroutine)
    except LogError as exc:
        raise click.ClickException(str(exc)) from None


def _bounded(work: Callable[[], Awaitable[T]], timeout: float, *, retry: bool = True) -> T:
    """A dlq command's talk to the log: at most `timeout` seconds (exit 3), a permanent error one line."""
    try:
        return run_bounded(work, timeout, retry=retry)
    except LogError as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The mail configuration (TOML); its [delivery] table names the server.")
@click.option("--until-idle", is_flag=True,
              help="Exit once the routed topic is read to its end and no retry is due.")
@pass_command_context
def deliverer(context: CommandContext, config_path: Path, until_idle: bool) -> None:
    """Deliver routed messages to the organisation's SMTP/LMTP server, one copy per recipient."""
    settings, environ = context.settings, context.environ
    config = load_config(config_path)
    target = config.delivery
    password, token = smtp_password(target, environ), smtp_token(target, environ)
    log = open_log(settings)  # logging is set up by services.cli (POPBRIDGE_LOG_LEVEL, _FORMAT)
    wiring = _Wiring(target, password, token, notice_address(config))
    counts: Counts = _run(_deliver(log, settings, wiring, until_idle))
    click.echo(f"deliverer: {counts.delivered} delivered, {counts.deferred} deferred, "
               f"{counts.failed} failed, {counts.skipped} skipped as already delivered")


@dataclass(frozen=True)
class _Wiring:
    """What the delivery stage is built from besides the log: the target, its secrets, the postmaster."""

    target: SmtpTarget
    password: str | None
    token: TokenSource | None
    postmaster: str | None


async def _deliver(log: KafkaLog | EmbeddedLog, settings: DeploymentSettings, wiring: _Wiring,
                   until_idle: bool) -> Counts:
    target = wiring.target
    stop = stop_on_signals()
    policy = RetryPolicy(delays=target.retry_delays, max_age=timedelta(days=target.max_age_days))
    metrics, tracker = Metrics(), ProgressTracker()
    watch = None if until_idle else LagWatch.of(log, settings, "deliverer")
    port = None if until_idle else settings.http_port or None
    health = serve_health(port, tracker, metrics, watch=watch)
    gauges = contextlib.nullcontext() if until_idle else pipeline_watch(log, settings, metrics)
    async with health, gauges, SmtpTransport(target, wiring.password, token=wiring.token) as transport:
        stage = Deliverer(log, settings, transport, policy=policy, metrics=metrics,
                          postmaster=wiring.postmaster, tracker=tracker)
        if not await broker_ready(log, stage.topics.all(), "deliverer", stop):
            return stage.counts
        tracker.mark_ready()
        return await stage.run(until_idle=until_idle, stop=stop)


# --- dead letters ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """One dead-letter record, and whether its copy has been delivered since (by a retry)."""

    event: DeliveryDeadLettered
    delivered_since: bool

    @property
    def id(self) -> str:
        return self.event.routed.fetch_id[:12]


async def _read(log: Log, settings: DeploymentSettings, topic: str) -> list[Any]:
    group = settings.group(f"dlq-reader-{datetime.now(UTC):%Y%m%d%H%M%S%f}")
    async with log.consumer(group, [settings.topic(topic)]) as consumer:
        return await read_to_end(consumer)


async def dead_letters(log: Log, settings: DeploymentSettings) -> list[DeadLetter]:
    """Every dead letter on the topic, latest record per (fetch id, recipient), oldest first."""
    letters, ledger = await asyncio.gather(_read(log, settings, DEAD_LETTERS),
                                           _read(log, settings, DELIVERED))
    entries = [decode_record(record, RecipientDelivered) for record in ledger]
    done = {ledger_key(e.fetch_id, e.recipient) for e in entries if e is not None}
    latest: dict[bytes, DeliveryDeadLettered] = {}
    for record in sorted(letters, key=lambda r: r.timestamp_ms):
        event = decode_record(record, DeliveryDeadLettered)
        if event is not None:
            latest[ledger_key(event.routed.fetch_id, event.recipient)] = event
    return [DeadLetter(event, key in done) for key, event in latest.items()]


def _matching(letters: list[DeadLetter], letter_id: str, recipient: str | None) -> list[DeadLetter]:
    found = [d for d in letters if d.event.routed.fetch_id.startswith(letter_id)
             and (recipient is None or d.event.recipient == recipient)]
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
def dlq_list(
    context: CommandContext, show_all: bool, timeout: float) -> None:
    """One line per dead letter: id, when, recipient, server reply."""
    settings = context.settings
    letters = _bounded(lambda: dead_letters(open_log(settings), settings), timeout)
    for letter in letters:
        if show_all or not letter.delivered_since:
            click.echo(summary(letter))


def summary(letter: DeadLetter) -> str:
    """The one line `dlq list` prints."""
    event = letter.event
    status = "delivered" if letter.delivered_since else "open"
    reply = event.smtp_text.splitlines()[0] if event.smtp_text else ""
    return (f"{letter.id}  {event.dead_lettered_at:%Y-%m-%d %H:%M}  {status:9}  {event.recipient}  "
            f"{event.smtp_code or '-'} {reply}")


@dlq.command("show")
@click.argument("letter_id")
@click.option("--recipient", help="Only the copy for this recipient.")
@timeout_option
@pass_command_context
def dlq_show(
    context: CommandContext, letter_id: str, recipient: str | None, timeout: float) -> None:
    """The details of a dead letter: why it failed, what the server said, which message it is."""
    settings = context.settings
    letters = _bounded(lambda: dead_letters(open_log(settings), settings), timeout)
    for letter in _matching(letters, letter_id, recipient):
        click.echo(describe(letter))


def describe(letter: DeadLetter) -> str:
    """The multi-line description `dlq show` prints."""
    event, routed = letter.event, letter.event.routed
    headers = BytesHeaderParser(policy=compat32).parsebytes(routed.raw)
    lines = [
        f"id:            {letter.id}  (fetch id {routed.fetch_id})",
        f"recipient:     {event.recipient}",
        f"status:        {'delivered since' if letter.delivered_since else 'open'}",
        f"reason:        {event.reason}",
        f"server reply:  {event.smtp_code or '-'} {event.smtp_text}",
        f"server:        {event.server}",
        f"attempts:      {event.attempts}, last {event.dead_lettered_at:%Y-%m-%d %H:%M:%S %Z}",
        f"mailbox:       {routed.mailbox_id} on {routed.pop3_host}",
        f"envelope from: <{routed.envelope_sender or ''}>",
        f"size:          {len(routed.raw)} bytes",
    ]
    lines += [f"{name + ':':15}{headers[name]}" for name in ("From", "Subject", "Date", "Message-ID")
              if headers[name] is not None]
    return "\n".join(lines) + "\n"


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
    log = open_log(settings)
    letters = _bounded(lambda: dead_letters(log, settings), timeout)
    chosen = letters if retry_all else _matching(letters, letter_id or "", recipient)
    open_letters = [d for d in chosen if not d.delivered_since]
    count = _bounded(lambda: _requeue(log, settings, open_letters), timeout, retry=False)
    click.echo(f"dlq: {count} copies queued for retry")


async def _requeue(log: Log, settings: DeploymentSettings, letters: list[DeadLetter]) -> int:
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
