"""The delivered ledger: the (fetch id, recipient) pairs already handed over, per ledger partition owned.

The deliverer consults it before every send, so a redelivered offset, a rebalance or a router replay
delivers only the pairs that were not delivered before. The ledger topic (compacted, 30 days) is the
changelog; the pairs live in a local store on disk (services.deliverer.store), one set per partition.
The routed topic, the retry tiers and the ledger are co-partitioned by fetch id, and one consumer with the
range assignor reads them, so every record of a pair is handled by the one replica that owns the pair's
partition: that replica writes the pair to its store before it commits, and no other replica needs to know.
On an assignment the replica restores each partition it gained (reads the changelog from the store's
checkpoint to the end) before it handles any record of that partition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import TypeVar

from schemas.codec import EventDecodeError, decode
from schemas.events import RecipientDelivered
from services.deliverer.store import LedgerStore, Pair
from services.runtime.log import Log, LogConsumer, LogError, Record, Written

logger = logging.getLogger(__name__)
T = TypeVar("T")


def decode_record(record: Record, cls: type[T]) -> T | None:
    """The event a record holds, or None (logged) for one that is not a valid `cls`: it is skipped."""
    try:
        return decode(record.value, cls)
    except EventDecodeError as exc:
        _log_skipped(record, exc)
        return None


def _log_skipped(record: Record, exc: Exception) -> None:
    logger.error("%s[%d]@%d skipped: %s", record.topic, record.partition, record.offset, exc)


def ledger_key(fetch_id: str, recipient: str) -> bytes:
    """The compaction key of one pair."""
    return f"{fetch_id}\x00{recipient}".encode()


async def read_to_end(consumer: LogConsumer, poll_seconds: float = 0.5) -> list[Record]:
    """Every record from the consumer's position to the end of its partitions (as of when it catches up)."""
    records: list[Record] = []
    while not await consumer.caught_up():
        records.extend(await consumer.fetch(poll_seconds))
    return records


class Ledger:
    """The delivered pairs of the ledger partitions this replica owns (`own`), asked one pair at a time."""

    def __init__(self, log: Log, store: LedgerStore, *, retention_ms: int, now_ms: Callable[[], int]) -> None:
        self._log = log
        self._store = store
        self._retention_ms = retention_ms
        self._now_ms = now_ms
        self._owned: set[int] = set()
        self._releases = 0  # how many times partitions were released (a rebalance during a restore)
        self._expired_at = 0

    @property
    def owned(self) -> set[int]:
        return set(self._owned)

    def delivered(self, fetch_id: str, recipient: str) -> bool:
        return self._store.delivered(fetch_id, recipient)

    def record(
        self, partition: int, entries: Sequence[RecipientDelivered], written: Sequence[Written]
    ) -> None:
        """Entries this replica just made durable on the changelog (at `written`), into the store now:
        before the batch commits, so the next record of the pair, here, finds it."""
        pairs = [(e.fetch_id, e.recipient, _ms(e.delivered_at)) for e in entries]
        self._store.record(partition, pairs, [w.offset for w in written])

    def release(self, partitions: Collection[int]) -> None:
        """Partitions revoked: restored again (from their checkpoint) if they come back."""
        self._owned -= set(partitions)
        self._releases += 1

    async def own(self, partitions: Collection[int]) -> None:
        """Own exactly `partitions`: forget the others, restore the ones gained. Returns once restored;
        a partition released while it was being restored stays unowned (the next call restores it)."""
        gained = set(partitions) - self._owned
        self._owned &= set(partitions)
        if gained:
            releases = self._releases
            await self._restore(gained)
            if releases == self._releases:
                self._owned |= gained
        if self._now_ms() - self._expired_at > EXPIRE_EVERY_MS:
            self._expired_at = self._now_ms()
            gone = self._store.expire(self._expired_at - self._retention_ms)
            if gone:
                logger.info("deliverer ledger: %d pairs past the retention removed from the store", gone)

    async def _restore(self, partitions: set[int]) -> None:
        started, topic = time.monotonic(), self._store.topic
        ends = await self._log.end_offsets(topic)
        starts = {p: self._checkpoint(p, ends.get(p, 0)) for p in partitions}
        applied, pending, upto = 0, dict[int, list[Pair]](), dict[int, int]()
        async for batch in self._log.read_from(topic, starts):
            for partition, records in _by_partition(batch).items():
                pending.setdefault(partition, []).extend(_pairs(records))
                upto[partition] = records[-1].offset + 1
                applied += len(records)
            if sum(map(len, pending.values())) >= RESTORE_CHUNK:
                self._apply(pending, upto)
        self._apply(pending, upto)
        self._store.merge_staged()
        for p in partitions:  # the end, past any tail the log holds no record at (compaction, markers)
            self._store.apply(p, (), max(starts[p], ends.get(p, 0)))
        logger.info("deliverer ledger: partitions %s restored, %d changelog records applied in %.1f s",
                    sorted(partitions), applied, time.monotonic() - started)

    def _apply(self, pending: dict[int, list[Pair]], upto: dict[int, int]) -> None:
        """The pairs read, staged in the store with their checkpoints, one transaction per partition."""
        for partition, pairs in pending.items():
            self._store.stage(partition, pairs, upto[partition])
        pending.clear()

    def _checkpoint(self, partition: int, end: int) -> int:
        checkpoint = self._store.checkpoint(partition)
        if checkpoint > end:
            logger.warning("deliverer ledger: the store's checkpoint %d of %s[%d] is past its end %d (the"
                           " topic was recreated): that partition is read again from its start",
                           checkpoint, self._store.topic, partition, end)
            self._store.reset(partition)
            return 0
        return checkpoint


EXPIRE_EVERY_MS = 60 * 60 * 1000  # the store drops pairs past the retention at most this often
# Pairs read before they are staged in the store in one transaction: bounds what a restore holds in memory.
# Their order does not matter any more: the store merges what a restore staged in key order at its end
# (LedgerStore.merge_staged). Before, each chunk was inserted at once, in key order, and rewrote nearly every
# page of the table once the table outgrew the page cache: 4 of 12 partitions of 10M pairs took 133 s
# (load 9), 47 s staged (load 4-5) (bench/scale_deliverer.py).
RESTORE_CHUNK = 100_000


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _by_partition(records: Sequence[Record]) -> dict[int, list[Record]]:
    grouped: dict[int, list[Record]] = {}
    for record in records:
        grouped.setdefault(record.partition, []).append(record)
    return grouped


def _pairs(records: Sequence[Record]) -> list[tuple[str, str, int]]:
    """The pairs of changelog records (a record that is not a RecipientDelivered is skipped, logged)."""
    entries = (decode_record(r, RecipientDelivered) for r in records)
    return [(e.fetch_id, e.recipient, _ms(e.delivered_at)) for e in entries if e is not None]


class CoPartitionError(LogError):
    """The routed topic, the retry tiers and the ledger do not have one partition count: a deployment
    mistake (topics created by hand, or partitions added to one), which waiting will not mend."""

    retriable = False


async def check_co_partitioned(log: Log, topics: Sequence[str]) -> None:
    """Raise CoPartitionError (one line) unless every topic of `topics` has the same number of partitions."""
    counts = {topic: len(await log.end_offsets(topic)) for topic in topics}
    unknown = sorted(topic for topic, count in counts.items() if count == 0)
    if unknown:  # just created, the metadata not everywhere yet (a missing topic is reported before this)
        raise LogError(f"deliverer: no partitions known yet for {', '.join(unknown)}")
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{topic} {count}" for topic, count in counts.items())
        raise CoPartitionError(f"deliverer: topics not co-partitioned (partitions: {listed}): each needs"
                               f" {max(counts.values())}, as `popbridge topics create` makes them")
