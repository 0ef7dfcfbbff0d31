"""Records on the embedded log: the partition of a record, appending (checked against its topic's config)
and reading, and the producer, which commits concurrent sends together.

Semantics follow Kafka: a key picks its partition by a stable hash (crc32) modulo the partition count,
keyless records go round robin; offsets start at 0 per partition; timestamps are append time in ms (never
decreasing within a partition). `max.message.bytes` is enforced, and a compacted topic refuses keyless
records, as the broker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.topics import MAX_MESSAGE_BYTES
from services.runtime.embedded.schema import EmbeddedLogError, transaction
from services.runtime.embedded.worker import Changes, Clock, Worker
from services.runtime.log import LogError, Outgoing, Record, TopicPartition, Written

FETCH_MAX_BYTES = MAX_MESSAGE_BYTES  # one fetch stops after this many value bytes (at least one record)


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition of a keyed record: stable across processes and releases (never Python's hash())."""
    return zlib.crc32(key) % partitions



@dataclass(frozen=True)
class Topic:
    name: str
    partitions: int
    config: dict[str, str]

    @property
    def compacted(self) -> bool:
        return "compact" in self.config.get("cleanup.policy", "delete").split(",")

    def check(self, record: Outgoing) -> None:
        size = len(record.value) + len(record.key or b"")
        limit = int(self.config.get("max.message.bytes", MAX_MESSAGE_BYTES))
        if size > limit:
            raise EmbeddedLogError(
                f"record of {size} bytes exceeds max.message.bytes={limit} of topic {self.name!r}",
                retriable=False,
            )
        if record.key is None and self.compacted:
            raise EmbeddedLogError(f"topic {self.name!r} is compacted: a record needs a key", retriable=False)


def load_topic(conn: sqlite3.Connection, name: str) -> Topic:
    row = conn.execute("SELECT partitions, config FROM topics WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise EmbeddedLogError(
            f"unknown topic {name!r}: create it first (popbridge topics create)", retriable=False
        )
    return Topic(name, row[0], json.loads(row[1]))


def bounds(conn: sqlite3.Connection, tp: TopicPartition) -> tuple[int, int]:
    row = conn.execute(
        "SELECT log_start, log_end FROM partitions WHERE topic = ? AND part = ?", (tp.topic, tp.partition)
    ).fetchone()
    if row is None:
        raise EmbeddedLogError(f"unknown partition {tp.topic}/{tp.partition}", retriable=False)
    return row[0], row[1]


def _insert(conn: sqlite3.Connection, record: Outgoing, part: int, now_ms: int) -> Written:
    log_end, last_ms = conn.execute(
        "SELECT log_end, last_ms FROM partitions WHERE topic = ? AND part = ?", (record.topic, part)
    ).fetchone()
    timestamp = max(now_ms, last_ms)  # never decreasing, so offsets_for_time is well defined
    conn.execute(
        "INSERT INTO records (topic, part, record_offset, timestamp_ms, key, value)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (record.topic, part, log_end, timestamp, record.key, record.value),
    )
    conn.execute(
        "UPDATE partitions SET log_end = ?, last_ms = ? WHERE topic = ? AND part = ?",
        (log_end + 1, timestamp, record.topic, part),
    )
    return Written(record.topic, part, log_end)


def append(
    conn: sqlite3.Connection, batch: Sequence[Sequence[Outgoing]], now_ms: int, round_robin: dict[str, int]
) -> list[list[Written] | LogError]:
    """Write every valid request of `batch` in one transaction; an invalid request gets its error."""
    outcomes: list[list[Written] | LogError] = []
    with transaction(conn):
        topics: dict[str, Topic] = {}
        for records in batch:
            try:
                placed = [(r, _place(conn, r, topics, round_robin)) for r in records]
            except EmbeddedLogError as exc:
                outcomes.append(exc)
                continue
            outcomes.append([_insert(conn, r, part, now_ms) for r, part in placed])
    return outcomes


def _place(
    conn: sqlite3.Connection, record: Outgoing, topics: dict[str, Topic], round_robin: dict[str, int]
) -> int:
    topic = topics.get(record.topic) or topics.setdefault(record.topic, load_topic(conn, record.topic))
    topic.check(record)
    if record.partition is not None:
        if not 0 <= record.partition < topic.partitions:
            raise EmbeddedLogError(
                f"topic {record.topic} has no partition {record.partition}", retriable=False
            )
        return record.partition
    if record.key is not None:
        return partition_for_key(record.key, topic.partitions)
    turn = round_robin.get(record.topic, 0)
    round_robin[record.topic] = turn + 1
    return turn % topic.partitions


def read_records(
    conn: sqlite3.Connection, tp: TopicPartition, start: int, limit: int, max_bytes: int
) -> list[Record]:
    """Records of `tp` from offset `start`: at most `limit`, stopping once `max_bytes` of values are read."""
    records: list[Record] = []
    size = 0
    query = (
        "SELECT record_offset, key, value, timestamp_ms FROM records"
        " WHERE topic = ? AND part = ? AND record_offset >= ? ORDER BY record_offset LIMIT ?"
    )
    with contextlib.closing(conn.execute(query, (tp.topic, tp.partition, start, limit))) as rows:
        for offset, key, value, timestamp in rows:
            records.append(Record(tp.topic, tp.partition, offset, key, value, timestamp))
            size += len(value)
            if size >= max_bytes:
                break
    return records


# --- producer --------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    records: Sequence[Outgoing]
    done: asyncio.Future[list[Written]]


class EmbeddedProducer:
    """LogProducer on the embedded log. Sends made while a commit is in progress share the next one."""

    def __init__(self, worker: Worker, changes: Changes, clock: Clock) -> None:
        self._worker = worker
        self._changes = changes
        self._clock = clock
        self._round_robin: dict[str, int] = {}
        self._pending: list[_Request] = []
        self._flushing: asyncio.Task[None] | None = None

    async def send(self, record: Outgoing) -> Written:
        return (await self.send_all([record]))[0]

    async def send_all(self, records: Sequence[Outgoing]) -> list[Written]:
        if not records:
            return []
        request = _Request(list(records), asyncio.get_running_loop().create_future())
        self._pending.append(request)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        return await request.done

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            outcomes: Sequence[list[Written] | BaseException]
            try:
                now_ms = int(self._clock() * 1000)
                outcomes = await self._worker.run(
                    append, [r.records for r in batch], now_ms, self._round_robin
                )
            except Exception as exc:  # every request of the batch learns why; the flush itself goes on
                outcomes = [exc] * len(batch)
            for request, outcome in zip(batch, outcomes, strict=True):
                if request.done.done():
                    continue  # the sender was cancelled: its records may or may not be written
                if isinstance(outcome, BaseException):
                    request.done.set_exception(outcome)
                else:
                    request.done.set_result(outcome)
            self._changes.notify()

    async def drain(self) -> None:
        """Wait until every send made so far is settled."""
        while self._flushing is not None and not self._flushing.done():
            await asyncio.wait([self._flushing])
