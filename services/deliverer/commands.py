"""`popbridge deliverer`: the delivery stage's command (its dead letters are services.ops.dlq).

It takes the deployment settings from the typed command context (services.runtime.context, set by
services.cli) and opens the log with services.runtime.connect.open_log. A config mistake raises
ConfigError (one line, exit code 2); a log that refuses is one line and exit code 1; it waits for the
broker rather than giving up. The SMTP password is read here, from `password_env` or
`password_file`, and goes nowhere but the AUTH command; an XOAUTH2 token is read by the source built
here, afresh for every session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from schemas.topics import DELIVERED
from services.deliverer.retry import RetryPolicy
from services.deliverer.service import Counts, Deliverer
from services.deliverer.smtp import SmtpTransport, TokenSource
from services.runtime.broker_wait import broker_ready
from services.runtime.connect import DEFAULT_DATA_DIR, open_log
from services.runtime.context import CommandContext, pass_command_context
from services.runtime.embedded import EmbeddedLog
from services.runtime.health import LagWatch, ProgressTracker, serve_health
from services.runtime.kafka import KafkaLog
from services.runtime.log import LogError
from services.runtime.metrics import Metrics
from services.runtime.oauth2_tokens import DELIVERY, TokenSources, oauth2_directory
from services.runtime.secrets import read_secret, read_token
from services.runtime.settings import DeploymentSettings, MailConfig, SmtpTarget, load_config
from services.runtime.signals import stop_on_signals

T = TypeVar("T")


def smtp_password(target: SmtpTarget, environ: Mapping[str, str]) -> str | None:
    """The referenced SMTP password, when the target authenticates; ConfigError names the reference."""
    if target.auth == "xoauth2" or not (target.username or target.password_env or target.password_file):
        return None
    return read_secret(env=target.password_env, file=target.password_file, environ=environ, what="delivery")


def smtp_token(target: SmtpTarget, environ: Mapping[str, str], data_dir: str = "") -> TokenSource | None:
    """The bearer token source of an XOAUTH2 target, read afresh for every session; else None. With an
    [delivery.oauth2] table popbridge gets the token itself (cached as `delivery` under `data_dir`)."""
    if target.auth != "xoauth2":
        return None
    if target.oauth2 is not None:
        sources = TokenSources(oauth2_directory(data_dir), environ)
        return sources.source(DELIVERY, target.oauth2, what="delivery")

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
    password, token = smtp_password(target, environ), smtp_token(target, environ, settings.data_dir)
    log = open_log(settings)  # logging is set up by services.cli (POPBRIDGE_LOG_LEVEL, _FORMAT)
    wiring = _Wiring(target, password, token, notice_address(config))
    counts: Counts = _run(_deliver(log, settings, wiring, until_idle))
    click.echo(f"deliverer: {counts.delivered} delivered, {counts.deferred} deferred, "
               f"{counts.failed} failed, {counts.skipped} skipped as already delivered")


def state_path(log: KafkaLog | EmbeddedLog, settings: DeploymentSettings) -> Path | None:
    """Where the deliverer keeps its ledger store: `<data dir>/deliverer/` with Kafka (a volume of the pod,
    README "Deliverer state"); None with the embedded log, whose own file holds the ledger table."""
    if isinstance(log, EmbeddedLog):
        return None
    data_dir = Path(settings.data_dir).expanduser() if settings.data_dir else DEFAULT_DATA_DIR.expanduser()
    # One file per ledger topic: its pairs are that ledger's, and a second deployment (another topic
    # prefix) on the same data dir must never take them for its own deliveries and skip its mail.
    return data_dir / "deliverer" / f"{settings.topic(DELIVERED)}.sqlite3"


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
    # The watch's one read of every stage's lag also keeps the pipeline gauges (services.runtime.health).
    watch = None if until_idle else LagWatch.of(log, settings, "deliverer")
    port = None if until_idle else settings.http_port or None
    health = serve_health(port, tracker, metrics, watch=watch)
    async with health, SmtpTransport(target, wiring.password, token=wiring.token) as transport:
        stage = Deliverer(log, settings, transport, policy=policy, metrics=metrics,
                          postmaster=wiring.postmaster, tracker=tracker, state_path=state_path(log, settings))
        if not await broker_ready(log, stage.topics.all(), "deliverer", stop):
            return stage.counts
        tracker.mark_ready()
        return await stage.run(until_idle=until_idle, stop=stop)
