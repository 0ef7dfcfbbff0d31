"""`popbridge fetcher`: poll the configured POP3 mailboxes and publish what they hold."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path
from typing import Protocol

import click

from schemas.topics import FETCH_ASSIGNMENT, FETCH_STATE, FETCHED
from services.fetcher import status
from services.fetcher.fetch_state import ChangelogReader, FetchMemory, open_memory, store_path
from services.fetcher.placement import Ownership
from services.fetcher.service import Fetcher, PassResult
from services.fetcher.sharing import Handover, MemoryRefresh, Passes, hold_assignment
from services.fetcher.status import Timing
from services.runtime.broker_wait import Backoff, broker_ready, sleep_or_stop, unwrapped
from services.runtime.connect import kafka_log
from services.runtime.context import CommandContext, pass_command_context
from services.runtime.health import ProgressTracker, serve_health
from services.runtime.kafka import KafkaLog
from services.runtime.log import Log, LogError
from services.runtime.metrics import Metrics
from services.runtime.outage import BROKER
from services.runtime.pipeline_gauges import pipeline_watch
from services.runtime.settings import ConfigError, DeploymentSettings, Mailbox, MailConfig, load_config
from services.runtime.signals import stop_on_signals, until_stopped

log = logging.getLogger("popbridge.fetcher")

FIRST_POLL_SPREAD = 5.0  # seconds over which the first polls of many mailboxes are spread
OWNERSHIP_CHECK = 1.0
CATCH_UP_EVERY = 60.0  # seconds between checkpoints of the fetch-state store: a restart reads this tail


def next_delay(
    mailbox: Mailbox,
    failures: int,
    rng: random.Random,
    *,
    retry_after: float | None = None,
    login_delay: float | None = None,
) -> float:
    """The wait before the next poll of `mailbox` (see services.fetcher.status.next_delay)."""
    return status.next_delay(Timing(mailbox.poll_interval, failures, retry_after, login_delay), rng)


class FetcherLog(Log, ChangelogReader, Protocol):
    """The log as the fetcher uses it: a Log whose fetch-state changelog it reads by partition and offset."""


def open_fetch_memory(
    log_: ChangelogReader, settings: DeploymentSettings
) -> AbstractAsyncContextManager[FetchMemory]:
    """The fetcher's memory, caught up with the fetch-state changelog from its checkpoint (the tail only,
    when the store on disk survived the restart: see services.fetcher.memory.store_path)."""
    return open_memory(log_, settings.topic(FETCH_STATE), store_path(log_, settings.data_dir))


async def keep_caught_up(memory: FetchMemory, every: float = CATCH_UP_EVERY) -> None:
    """Move the store's checkpoint past what this replica wrote, so that a restart reads a short tail."""
    while True:
        await asyncio.sleep(every)
        try:
            await memory.catch_up()
        except LogError as exc:  # the next one reads the same tail; a restart meanwhile reads a longer one
            log.info("fetch state: catching up with the changelog failed, trying again later: %s", exc)


async def run_fetcher(
    log_: FetcherLog,
    settings: DeploymentSettings,
    config: MailConfig,
    environ: dict[str, str],
    *,
    once: bool,
    metrics: Metrics | None = None,
    tracker: ProgressTracker | None = None,
    shared: bool = False,
) -> list[PassResult]:
    """One pass over every mailbox (`once`), or poll each one on its own interval until cancelled.

    `shared` (replicas of `popbridge fetcher`): poll only the mailboxes the fetcher group assigns to this
    replica (services.fetcher.sharing). Otherwise (`--once`, the single-process `popbridge run`) every
    mailbox is polled here.
    """
    async with open_fetch_memory(log_, settings) as memory, log_.producer() as producer:
        fetcher = Fetcher(
            settings=settings, producer=producer, memory=memory, environ=environ, metrics=metrics,
            tracker=tracker, max_parallel_mailboxes=config.max_parallel_mailboxes,
        )  # fmt: skip
        fetcher.limit_hosts(config.mailboxes)
        if once:
            return await fetcher.poll_all(config.mailboxes)
        if tracker is not None:
            tracker.mark_ready()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(keep_caught_up(memory))
            if shared:
                await poll_shared(log_, settings, fetcher, config.mailboxes)
            else:
                await asyncio.gather(*(poll_forever(fetcher, m) for m in config.mailboxes))
    return []


async def poll_shared(
    log_: Log, settings: DeploymentSettings, fetcher: Fetcher, mailboxes: Sequence[Mailbox]
) -> None:
    """Poll, until cancelled, the mailboxes whose assignment partitions this replica holds."""
    ownership = Ownership(tuple(m.id for m in mailboxes))
    topic = settings.topic(FETCH_ASSIGNMENT)
    refresh = MemoryRefresh(fetcher.memory, ownership)
    fetcher.before_plan = refresh.before_plan
    passes = Passes()
    handover = Handover(topic, ownership, passes)
    watched = [settings.topic(t) for t in (FETCHED, FETCH_STATE, FETCH_ASSIGNMENT)]
    broker_back = partial(broker_ready, log_, watched, "fetcher", None)
    async with (
        log_.consumer(settings.group("fetcher"), [topic], on_revoked=handover.revoked) as consumer,
        asyncio.TaskGroup() as tasks,
    ):
        tasks.create_task(hold_assignment(consumer, topic, ownership))
        for mailbox in mailboxes:
            tasks.create_task(
                poll_forever(fetcher, mailbox, owns=lambda m: ownership.owns(m.id), passes=passes,
                         broker_back=broker_back)
            )


async def poll_forever(
    fetcher: Fetcher,
    mailbox: Mailbox,
    *,
    owns: Callable[[Mailbox], bool] | None = None,
    passes: Passes | None = None,
    broker_back: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Poll one mailbox on its own interval, backing off after failures, until cancelled.

    `owns` (mailbox sharing) says whether this replica may poll the mailbox now; while it may not,
    the loop only checks again every OWNERSHIP_CHECK seconds. `passes` registers each pass, right after
    that check, so a rebalance revoking the mailbox waits for it (or aborts it). `broker_back` waits until
    the broker answers again: a pass that could not publish (the broker away) is run again as soon as it
    does, not after the mailbox's backoff (which is for the POP3 server's troubles).
    """
    rng = random.Random()  # noqa: S311 - poll jitter, not cryptography
    await asyncio.sleep(rng.uniform(0, min(mailbox.poll_interval, FIRST_POLL_SPREAD)))
    failures = 0
    while True:
        if owns is not None and not owns(mailbox):
            failures = 0
            await asyncio.sleep(OWNERSHIP_CHECK)
            continue
        if passes is None:
            result = await fetcher.poll(mailbox)
        else:
            ran = await passes.run(mailbox.id, fetcher.poll(mailbox))
            if ran is None:
                continue  # aborted: the mailbox was handed over
            result = ran
        if result.state == "publish-failed" and broker_back is not None:
            await broker_back()
            continue
        failures = failures + 1 if result.error else 0
        delay = next_delay(
            mailbox, failures, rng, retry_after=result.retry_after, login_delay=result.login_delay
        )
        await asyncio.sleep(delay)


async def serve_fetcher(
    log_: KafkaLog, settings: DeploymentSettings, config: MailConfig, environ: dict[str, str]
) -> None:
    """The long-running `popbridge fetcher`: poll forever, with /healthz, /readyz and /metrics.

    It never exits on something Kafka recovers from: it waits for the broker before it starts (not ready
    meanwhile), and a Kafka failure that ends the polling (the assignment consumer could not rejoin)
    starts it again after a backoff, memory reloaded. A permanent log error (a refused login, a missing
    topic) propagates as its LogError."""
    metrics, tracker = Metrics(), ProgressTracker()
    stop = stop_on_signals()
    topics = [settings.topic(t) for t in (FETCHED, FETCH_STATE, FETCH_ASSIGNMENT)]
    backoff = Backoff()
    health = serve_health(settings.http_port or None, tracker, metrics)
    async with health, pipeline_watch(log_, settings, metrics):
        while await broker_ready(log_, topics, "fetcher", stop):
            polling = run_fetcher(
                log_, settings, config, environ, once=False, metrics=metrics, tracker=tracker, shared=True
            )
            try:
                await unwrapped(until_stopped(polling, stop))
            except LogError as exc:
                if not exc.retriable:
                    raise
                tracker.mark_ready(False)
                BROKER.failed(f"fetcher: {exc}: starting again")
            else:
                return
            if await sleep_or_stop(backoff.next(), stop):
                return


@click.command()
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help="Mail config (TOML)."
)
@click.option("--once", is_flag=True, help="One pass over every mailbox, then exit.")
@pass_command_context
def fetcher(context: CommandContext, config_path: Path, once: bool) -> None:
    """Poll the POP3 mailboxes and publish each message to the fetched topic."""
    settings, environ = context.settings, context.environ
    config = load_config(config_path)
    if not settings.kafka_bootstrap:
        raise ConfigError("environment: POPBRIDGE_KAFKA_BOOTSTRAP is not set")
    log_ = kafka_log(settings)
    try:
        if not once:
            asyncio.run(serve_fetcher(log_, settings, config, environ))
            return
        results = asyncio.run(run_fetcher(log_, settings, config, environ, once=True))
    except LogError as exc:  # a permanent one (or, with --once, the broker away): one line, no traceback
        raise click.ClickException(str(exc)) from None
    for result in results:
        state = f"error: {result.error}" if result.error else "ok"
        click.echo(
            f"{result.mailbox_id}: published={result.published} deleted={result.deleted} "
            f"too_big={result.too_big} skipped={result.skipped} {state}"
        )
    if any(r.error for r in results):
        raise SystemExit(1)
