"""The router stage as a plain loop on any Log (embedded or Kafka): the same pure core as the faust app.

    fetched --(consume, group `<prefix>-router`)--> route_fetched --> apply_dedupe --> routed
                                                                          |
                                          the dedupe table (services.router.seen_store) <--+

faust cannot run on the embedded log, so `popbridge run` uses this loop. The dedupe table lives with
the log (services.router.seen_store): on the embedded log, an indexed table in its file, read per
Message-ID of each batch; on Kafka, the compacted `seen-copies` topic. A batch's table changes are
stored before its routed events are sent. One loop holds the whole table, so run one loop per
deployment (copies of one message sit on different partitions of the fetched topic; two loops would
each see only some of them). Entries past the window are deleted every EXPIRE_EVERY seconds.

Processing is at-least-once: offsets are committed only once the routed events and the table changes
of the batch are durable. A batch re-read after a crash routes each copy again under its own fetch id,
which dedupe never suppresses (it only suppresses a recipient routed by ANOTHER copy), and the
deliverer's ledger keeps the repeated event from being delivered twice.

A bad record never stops the loop: a record that is not a MailFetched event is logged (topic, partition,
offset) and skipped; a message the core fails on goes to the postmaster (`to_postmaster`), logged with
its fetch id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeVar

from schemas import codec
from schemas.events import MailFetched, RecipientsResolved
from schemas.topics import FETCHED, ROUTED
from services.router.dedupe import DEFAULT_WINDOW, SeenBodies, apply_dedupe, dedupe_key
from services.router.seen_store import SeenStore, SeenTable, load_table, open_seen_store
from services.router.stage import route_fetched, to_postmaster
from services.runtime.log import Log, LogError, Outgoing, Record, next_offsets
from services.runtime.metrics import Metrics
from services.runtime.settings import DeploymentSettings, MailConfig

log = logging.getLogger("popbridge.router")
T = TypeVar("T")

Clock = Callable[[], datetime]
__all__ = ["RouterCounts", "RouterLoop", "SeenTable", "load_table", "route_record"]
EXPIRE_EVERY = 60.0  # seconds between two passes deleting dedupe entries past the window
RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0)  # seconds between tries of a send the log could not make durable


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class RouterCounts:
    """What one run of the loop did, per fetched record."""

    routed: int = 0
    suppressed: int = 0  # recipients left out because another copy already routed them
    postmaster: int = 0  # messages the core failed on, sent to the postmaster
    skipped: int = 0  # records that were not MailFetched events


@dataclass(frozen=True)
class Routed:
    """One routed event and, when it was deduplicated, the new table value for its Message-ID."""

    event: RecipientsResolved
    seen: tuple[bytes, SeenBodies] | None = None
    failed: bool = False  # the core failed on the message: it goes to the postmaster


def route_record(
    record: Record, config: MailConfig, table: SeenTable, now: datetime, window: timedelta = DEFAULT_WINDOW
) -> Routed | None:
    """Route and dedupe one fetched record against `table` (updated in place); None for a bad record."""
    routed = route_only(record, config, now)
    if routed is None or routed.failed:
        return routed
    return dedupe(routed.event, table, now, window)


def route_only(record: Record, config: MailConfig, now: datetime) -> Routed | None:
    """Route one fetched record, not yet deduplicated; None for a bad record."""
    fetched = _decode(record)
    if fetched is None:
        return None
    try:
        return Routed(route_fetched(fetched, config, now))
    except Exception as exc:  # a bug in the core must not stop the stream or lose the message
        log.exception("fetch_id=%s: routing failed, sending to the postmaster", fetched.fetch_id)
        return Routed(to_postmaster(fetched, config, now, f"{type(exc).__name__}: {exc}"), failed=True)


def _decode(record: Record) -> MailFetched | None:
    try:
        return codec.decode(record.value, MailFetched)
    except codec.EventDecodeError as exc:
        problem = str(exc)
    log.error("%s[%d]@%d skipped: %s", record.topic, record.partition, record.offset, problem)
    return None


def dedupe(resolved: RecipientsResolved, table: SeenTable, now: datetime, window: timedelta) -> Routed:
    """Dedupe one routed message against `table` (updated in place)."""
    key = dedupe_key(resolved)
    if key is None:
        return Routed(resolved)
    try:
        emitted, remembered = apply_dedupe(resolved, table.get(key, {}), now, window)
    except Exception:  # keep the message moving: delivering a duplicate beats losing it
        log.exception("fetch_id=%s: dedupe failed, routing without it", resolved.fetch_id)
        return Routed(resolved)
    table[key] = remembered
    return Routed(emitted, (key, remembered))


@dataclass
class RouterLoop:
    """The plain router: `run` consumes the fetched topic until stopped or, with `until_idle`, caught up."""

    log: Log
    settings: DeploymentSettings
    config: MailConfig
    clock: Clock = utc_now
    dedupe_window: timedelta = DEFAULT_WINDOW
    batch_size: int = 64
    poll_seconds: float = 0.5
    counts: RouterCounts = field(default_factory=RouterCounts)
    metrics: Metrics | None = None

    async def run(self, *, until_idle: bool = False, stop: asyncio.Event | None = None) -> RouterCounts:
        stop = stop or asyncio.Event()
        fetched = self.settings.topic(FETCHED)
        seen = await open_seen_store(self.log, self.settings, self.clock(), self.dedupe_window)
        async with seen, self.log.producer() as producer, self.log.consumer(
            self.settings.group("router"), [fetched]
        ) as consumer:
            expire_at = 0.0
            while not stop.is_set():
                if time.monotonic() >= expire_at:
                    await self._expire(seen)
                    expire_at = time.monotonic() + EXPIRE_EVERY
                records = await consumer.fetch(self.poll_seconds, self.batch_size)
                if records:
                    changes, out = await self._route_batch(records, seen)
                    stored = await self._durably(partial(seen.store, changes), stop)
                    await self._durably(partial(producer.send_all, [*stored, *out]), stop)
                    await consumer.commit(next_offsets(records))
                elif until_idle and await consumer.caught_up():
                    break
        return self.counts

    async def _expire(self, seen: SeenStore) -> None:
        try:
            deleted = await seen.expire(self.clock())
        except LogError as exc:  # the next pass tries again; routing goes on
            log.warning("router: deleting expired dedupe entries failed: %s", exc)
            return
        if deleted:
            log.info("router: %d dedupe entries past the window deleted", deleted)

    async def _route_batch(
        self, records: Sequence[Record], seen: SeenStore
    ) -> tuple[dict[bytes, SeenBodies], list[Outgoing]]:
        """The batch's table changes and routed events. The table entries of the batch's Message-IDs are
        read first, in one lookup; copies within the batch see each other's changes."""
        now = self.clock()
        routed = [(record, route_only(record, self.config, now)) for record in records]
        keys = [key for _, r in routed if r is not None and not r.failed
                and (key := dedupe_key(r.event)) is not None]  # fmt: skip
        table = await self._durably(partial(seen.lookup, keys), None)
        changes: dict[bytes, SeenBodies] = {}
        out: list[Outgoing] = []
        for _, one in routed:
            if one is None:
                self.counts.skipped += 1
                if self.metrics is not None:
                    self.metrics.skipped("router")
                continue
            done = one if one.failed else dedupe(one.event, table, now, self.dedupe_window)
            if done.seen is not None:
                changes[done.seen[0]] = done.seen[1]
            self._count(done)
            event = done.event
            out.append(Outgoing(self.settings.topic(ROUTED), codec.encode(event), event.fetch_id.encode()))
        return changes, out

    def _count(self, routed: Routed) -> None:
        event = routed.event
        self.counts.routed += 1
        self.counts.suppressed += len(event.suppressed)
        self.counts.postmaster += routed.failed
        if self.metrics is not None:
            self.metrics.routed(event.reason)
        log.info(
            "routed fetch_id=%s reason=%s recipients=%d suppressed=%d rules=%s",
            event.fetch_id, event.reason, len(event.recipients), len(event.suppressed),
            event.rules_version or "-",
        )

    async def _durably(self, action: Callable[[], Awaitable[T]], stop: asyncio.Event | None) -> T:
        """Run `action` (a send to the log, a table read or write); a retriable log error is tried again
        (the batch is not committed meanwhile)."""
        for delay in RETRY_DELAYS:
            try:
                return await action()
            except LogError as exc:
                if not exc.retriable or (stop is not None and stop.is_set()):
                    raise
                log.warning("router: the log did not take the batch, retrying in %.1f s: %s", delay, exc)
                await asyncio.sleep(delay)
        return await action()
