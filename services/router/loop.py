"""The router stage as a plain loop on any Log (embedded or Kafka): the same pure core as the faust app.

    fetched --(consume, group `<prefix>-router`)--> route_fetched --> apply_dedupe --> routed
                                                                          |
                                     seen-copies (compacted, key: Message-ID) <--+

faust cannot run on the embedded log, so `popbridge run` uses this loop. The dedupe table lives in the log
itself: each change is written to the compacted `popbridge.router.seen-copies` topic in the same
`send_all` as the routed event, and the table is rebuilt with `Log.scan` when the loop starts. One loop
holds the whole table, so run one loop per deployment (copies of one message sit on different
partitions of the fetched topic; two loops would each see only some of them).

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec

from schemas import codec
from schemas.events import MailFetched, RecipientsResolved
from schemas.topics import FETCHED, ROUTED, ROUTER_SEEN_COPIES
from services.router.dedupe import (
    DEFAULT_WINDOW,
    SeenBodies,
    apply_dedupe,
    decode_seen,
    dedupe_key,
    encode_seen,
)
from services.router.stage import route_fetched, to_postmaster
from services.runtime.log import Log, LogError, LogProducer, Outgoing, Record, next_offsets
from services.runtime.metrics import Metrics
from services.runtime.settings import DeploymentSettings, MailConfig

log = logging.getLogger("popbridge.router")

Clock = Callable[[], datetime]
SeenTable = dict[bytes, SeenBodies]
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
    fetched = _decode(record)
    if fetched is None:
        return None
    try:
        resolved = route_fetched(fetched, config, now)
    except Exception as exc:  # a bug in the core must not stop the stream or lose the message
        log.exception("fetch_id=%s: routing failed, sending to the postmaster", fetched.fetch_id)
        return Routed(to_postmaster(fetched, config, now, f"{type(exc).__name__}: {exc}"), failed=True)
    return _dedupe(resolved, table, now, window)


def _decode(record: Record) -> MailFetched | None:
    try:
        return codec.decode(record.value, MailFetched)
    except codec.EventDecodeError as exc:
        problem = str(exc)
    log.error("%s[%d]@%d skipped: %s", record.topic, record.partition, record.offset, problem)
    return None


def _dedupe(resolved: RecipientsResolved, table: SeenTable, now: datetime, window: timedelta) -> Routed:
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


def outgoing(routed: Routed, settings: DeploymentSettings) -> list[Outgoing]:
    """The records one routed message writes: the table change first, then the routed event."""
    event = routed.event
    records = []
    if routed.seen is not None:
        key, value = routed.seen
        records.append(Outgoing(settings.topic(ROUTER_SEEN_COPIES), encode_seen(value), key))
    records.append(Outgoing(settings.topic(ROUTED), codec.encode(event), event.fetch_id.encode()))
    return records


def load_table(values: Iterable[tuple[bytes | None, bytes]], now: datetime, window: timedelta) -> SeenTable:
    """The dedupe table from the compacted topic's records in log order (the latest per key wins);
    entries older than `window` are dropped, unreadable ones skipped."""
    table: SeenTable = {}
    for key, value in values:
        if key is None:
            continue
        seen = _decode_seen(key, value)
        if seen is None:
            continue
        fresh = {digest: copy for digest, copy in seen.items() if now - copy.first_seen <= window}
        if fresh:
            table[key] = fresh
        else:
            table.pop(key, None)
    return table


def _decode_seen(key: bytes, value: bytes) -> SeenBodies | None:
    try:
        return decode_seen(value)
    except msgspec.DecodeError as exc:
        problem = str(exc)
    log.error("seen-copies record for %r skipped: %s", key, problem)
    return None


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
        table = await self._load_table()
        fetched = self.settings.topic(FETCHED)
        async with self.log.producer() as producer, self.log.consumer(
            self.settings.group("router"), [fetched]
        ) as consumer:
            while not stop.is_set():
                records = await consumer.fetch(self.poll_seconds, self.batch_size)
                if records:
                    await self._send(producer, self._route_batch(records, table), stop)
                    await consumer.commit(next_offsets(records))
                elif until_idle and await consumer.caught_up():
                    break
        return self.counts

    async def _load_table(self) -> SeenTable:
        records = self.log.scan(self.settings.topic(ROUTER_SEEN_COPIES))
        table = load_table([(r.key, r.value) async for r in records], self.clock(), self.dedupe_window)
        log.info("router: dedupe table loaded, %d Message-IDs", len(table))
        return table

    def _route_batch(self, records: Sequence[Record], table: SeenTable) -> list[Outgoing]:
        out: list[Outgoing] = []
        for record in records:
            routed = route_record(record, self.config, table, self.clock(), self.dedupe_window)
            if routed is None:
                self.counts.skipped += 1
                if self.metrics is not None:
                    self.metrics.skipped("router")
                continue
            self._count(routed)
            out += outgoing(routed, self.settings)
        return out

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

    async def _send(self, producer: LogProducer, records: list[Outgoing], stop: asyncio.Event) -> None:
        """Make the batch durable; a retriable log error is tried again (the batch is not committed)."""
        for delay in (*RETRY_DELAYS, None):
            try:
                await producer.send_all(records)
            except LogError as exc:
                if not exc.retriable or delay is None or stop.is_set():
                    raise
                log.warning("router: the log did not take the batch, retrying in %.1f s: %s", delay, exc)
                await asyncio.sleep(delay)
            else:
                return
