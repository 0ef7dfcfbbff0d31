"""`popbridge fetcher`: poll the configured POP3 mailboxes and publish what they hold."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import click

from schemas.topics import FETCH_STATE
from services.fetcher.memory import FetchMemory
from services.fetcher.service import Fetcher, PassResult
from services.runtime.kafka import KafkaLog
from services.runtime.log import Log
from services.runtime.settings import ConfigError, DeploymentSettings, Mailbox, MailConfig, load_config

log = logging.getLogger("popbridge.fetcher")

MAX_BACKOFF = 30 * 60.0


def next_delay(mailbox: Mailbox, failures: int, rng: random.Random) -> float:
    """The wait before the next poll: the interval with 10% jitter, doubled per consecutive failure."""
    delay = mailbox.poll_interval
    if failures:
        delay = max(delay, min(delay * 2 ** min(failures, 16), MAX_BACKOFF))
    return delay * rng.uniform(0.9, 1.1)


async def load_memory(log_: Log, settings: DeploymentSettings) -> FetchMemory:
    memory = FetchMemory()
    memory.load([record.value async for record in log_.scan(settings.topic(FETCH_STATE))])
    return memory


async def run_fetcher(
    log_: Log, settings: DeploymentSettings, config: MailConfig, environ: dict[str, str], *, once: bool
) -> list[PassResult]:
    memory = await load_memory(log_, settings)
    async with log_.producer() as producer:
        fetcher = Fetcher(settings=settings, producer=producer, memory=memory, environ=environ)
        if once:
            return await fetcher.poll_all(config.mailboxes)
        await asyncio.gather(*(_poll_forever(fetcher, m) for m in config.mailboxes))
    return []


async def _poll_forever(fetcher: Fetcher, mailbox: Mailbox) -> None:
    rng = random.Random()  # noqa: S311 - poll jitter, not cryptography
    failures = 0
    while True:
        result = await fetcher.poll(mailbox)
        failures = failures + 1 if result.error else 0
        await asyncio.sleep(next_delay(mailbox, failures, rng))


@click.command()
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help="Mail config (TOML)."
)
@click.option("--once", is_flag=True, help="One pass over every mailbox, then exit.")
@click.pass_obj
def fetcher(obj: object, config_path: Path, once: bool) -> None:
    """Poll the POP3 mailboxes and publish each message to the fetched topic."""
    settings: DeploymentSettings = obj.settings  # type: ignore[attr-defined]  # services.cli.Context
    environ: dict[str, str] = obj.environ  # type: ignore[attr-defined]
    config = load_config(config_path)
    if not settings.kafka_bootstrap:
        raise ConfigError("environment: POPBRIDGE_KAFKA_BOOTSTRAP is not set")
    results = asyncio.run(
        run_fetcher(KafkaLog(settings.kafka_bootstrap), settings, config, environ, once=once)
    )
    for result in results:
        state = f"error: {result.error}" if result.error else "ok"
        click.echo(
            f"{result.mailbox_id}: published={result.published} deleted={result.deleted} "
            f"too_big={result.too_big} {state}"
        )
    if any(r.error for r in results):
        raise SystemExit(1)
