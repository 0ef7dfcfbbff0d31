"""EmbeddedLog: the log interface (services.runtime.log) and the ops commands' admin calls on one SQLite
file, for a one-machine install.

Everything lives in `<data_dir>/log.sqlite3`, in WAL mode, so readers never block the writer and several
processes (the three stages, an ops command) can share it. Blocking SQLite calls run on one dedicated
thread per producer or consumer, each thread holding its own connection (worker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from schemas.topics import TopicSpec
from services.runtime.embedded.files import DB_NAME, warn_if_readable_by_others
from services.runtime.embedded.groups import (
    MAX_POLL_INTERVAL,
    MEMBER_TIMEOUT,
    EmbeddedConsumer,
    GroupMember,
    Member,
    list_active_members,
    list_groups,
    read_committed,
    write_committed,
)
from services.runtime.embedded.records import FETCH_MAX_BYTES, EmbeddedProducer, read_records
from services.runtime.embedded.retention import cleanup_policies, compact_topic, expire_topic
from services.runtime.embedded.schema import Synchronous, transaction
from services.runtime.embedded.worker import Changes, Clock, Worker
from services.runtime.log import LogError, OnRevoked, Record, TopicPartition, kept

POLL_INTERVAL = 0.2  # how soon a waiting fetch sees records another process wrote
P = ParamSpec("P")
T = TypeVar("T")

_logger = logging.getLogger(__name__)

_CHANGES: dict[Path, Changes] = {}  # one per database file, shared by every EmbeddedLog on it


class EmbeddedLog:
    """The log in one SQLite database under `data_dir`, shared by the stages and commands of one machine.

    `clock` (seconds, like time.time) stamps records and heartbeats; tests inject one.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        synchronous: Synchronous = "FULL",
        clock: Clock = time.time,
        member_timeout: float = MEMBER_TIMEOUT,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_NAME
        self._synchronous: Synchronous = synchronous
        self._clock = clock
        self._member_timeout = member_timeout
        self._poll_interval = poll_interval
        self._changes = _CHANGES.setdefault(self.path.absolute(), Changes())
        warn_if_readable_by_others(self.data_dir)

    def __repr__(self) -> str:
        return f"EmbeddedLog({str(self.data_dir)!r})"

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    @asynccontextmanager
    async def _worker(self) -> AsyncIterator[Worker]:
        worker = Worker(self.path, self._synchronous)
        try:
            yield worker
        finally:
            await worker.close()

    async def _admin(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        async with self._worker() as worker:
            return await worker.run(fn, *args, **kwargs)

    # The Log interface.

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> list[str]:
        created = await self._admin(_create_topics, specs)
        self._changes.notify()
        return created

    @asynccontextmanager
    async def producer(self) -> AsyncIterator[EmbeddedProducer]:
        async with self._worker() as worker:
            producer = EmbeddedProducer(worker, self._changes, self._clock)
            try:
                yield producer
            finally:
                await producer.drain()

    @asynccontextmanager
    async def consumer(
        self, group: str, topics: Sequence[str], *, on_revoked: OnRevoked | None = None,
        co_partitioned: bool = False,
    ) -> AsyncIterator[EmbeddedConsumer]:
        """A group member; `on_revoked` is awaited in its fetch before it releases partitions it is losing.

        `co_partitioned` is accepted and not honoured: assignment stays round robin. The one state that
        needs it (the deliverer's ledger) lives in this same file on one machine, shared by every member
        and written before each commit, so no member needs to own a partition's state alone."""
        member = GroupMember(group, tuple(topics), self._clock, int(self._member_timeout * 1000))
        async with self._worker() as worker:
            consumer = EmbeddedConsumer(worker, self._changes, member, self._poll_interval, on_revoked)
            await consumer.join()
            heartbeat = asyncio.create_task(
                consumer.heartbeat_forever(self._member_timeout / 5, MAX_POLL_INTERVAL)
            )
            try:
                yield consumer
            finally:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
                await self._leave(worker, member)

    async def _leave(self, worker: Worker, member: GroupMember) -> None:
        try:
            await worker.run(member.leave)
        except LogError as exc:  # the others take it for dead after member_timeout instead
            _logger.warning("embedded log: consumer could not leave group %s: %s", member.group, exc)
        self._changes.notify()

    # Admin operations for the ops commands.

    async def partitions(self, topic: str) -> list[int]:
        """The partition numbers of `topic` (empty when it does not exist)."""
        return sorted(await self._admin(_partition_bounds, topic))

    async def start_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset of the earliest record still kept."""
        return {p: start for p, (start, _) in (await self._admin(_partition_bounds, topic)).items()}

    async def end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset the next record will get."""
        return {p: end for p, (_, end) in (await self._admin(_partition_bounds, topic)).items()}

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        """Per partition that has one, the committed offset (next to read) of `group`."""
        return await self._admin(read_committed, group, topic)

    async def offsets_for_time(self, topic: str, timestamp_ms: int) -> dict[int, int]:
        """Per partition, the first offset with a timestamp >= `timestamp_ms`, else the end offset."""
        return await self._admin(_offsets_for_time, topic, timestamp_ms)

    async def set_committed(
        self, group: str, offsets: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        """Move the committed offsets of a stopped group, clamped to the records kept; returns what was set.

        Refused (EmbeddedLogError) while the group has a live consumer, which would overwrite them."""
        return await self._admin(
            write_committed, group, offsets, self._now_ms() - int(self._member_timeout * 1000)
        )

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[EmbeddedLog]:
        """The log itself: its lookups and reads cost no client start (OpsLog.reading)."""
        yield self

    async def read(
        self, topic: str, partition: int, start: int, end: int, *, key: bytes | None = None
    ) -> list[Record]:
        """The records of one partition with `start <= offset < end` (for trace and dead-letter commands),
        only those keyed `key` when given."""
        tp = TopicPartition(topic, partition)
        records = await self._admin(read_records, tp, start, max(0, end - start), 2**62)
        return [r for r in records if kept(r.offset, r.key, start, end, key)]

    async def read_from(self, topic: str, starts: Mapping[int, int]) -> AsyncIterator[list[Record]]:
        """The records of the partitions of `starts`, from each start to the end at the time of the call."""
        async with self._worker() as worker:
            bounds = await worker.run(_partition_bounds, topic)
            for part, start in sorted(starts.items()):
                position, end = max(start, bounds.get(part, (0, 0))[0]), bounds.get(part, (0, 0))[1]
                while position < end:
                    batch = await worker.run(
                        read_records, TopicPartition(topic, part), position, min(5000, end - position),
                        FETCH_MAX_BYTES,
                    )
                    if batch:
                        yield [r for r in batch if r.offset < end]
                    position = batch[-1].offset + 1 if batch else end

    async def scan(self, topic: str) -> AsyncIterator[Record]:
        """Every record of `topic`, partition by partition, up to the end at the time of the call."""
        async with self._worker() as worker:
            for part, (start, end) in (await worker.run(_partition_bounds, topic)).items():
                position = start
                while position < end:
                    tp = TopicPartition(topic, part)
                    batch = await worker.run(
                        read_records, tp, position, min(500, end - position), FETCH_MAX_BYTES
                    )
                    for record in batch:
                        if record.offset < end:  # compaction leaves gaps: the batch may pass the end
                            yield record
                    position = batch[-1].offset + 1 if batch else end

    async def groups(self) -> list[str]:
        """Every group with committed offsets or consumers."""
        return await self._admin(list_groups)

    async def active_members(self, group: str) -> list[Member]:
        """The live consumers of `group` and the partitions each owns."""
        alive_since_ms = self._now_ms() - int(self._member_timeout * 1000)
        return await self._admin(list_active_members, group, alive_since_ms)

    async def compact(self, topic: str) -> int:
        """Keep only the latest record of each key (keyless records stay); returns how many were deleted."""
        return await self._admin(compact_topic, topic)

    async def expire(self, topic: str) -> int:
        """Delete the records older than the topic's `retention.ms`; returns how many were deleted."""
        return await self._admin(expire_topic, topic, self._now_ms())

    async def clean_up(self) -> dict[str, int]:
        """Compaction and retention as each topic's `cleanup.policy` says; records deleted per topic."""
        deleted: dict[str, int] = {}
        for name, policy in await self._admin(cleanup_policies):
            count = await self.compact(name) if "compact" in policy else 0
            deleted[name] = count + (await self.expire(name) if "delete" in policy else 0)
        return deleted


# --- topics and offsets, run on a worker thread -----------------------------------------------------


def _create_topics(conn: sqlite3.Connection, specs: Sequence[TopicSpec]) -> list[str]:
    created: list[str] = []
    with transaction(conn):
        for spec in specs:
            if conn.execute("SELECT 1 FROM topics WHERE name = ?", (spec.name,)).fetchone():
                continue
            conn.execute(
                "INSERT INTO topics VALUES (?, ?, ?)", (spec.name, spec.partitions, json.dumps(spec.config))
            )
            conn.executemany(
                "INSERT INTO partitions (topic, part) VALUES (?, ?)",
                [(spec.name, p) for p in range(spec.partitions)],
            )
            created.append(spec.name)
        if created:  # consumers subscribed to a new topic get its partitions at their next fetch
            conn.execute("UPDATE groups SET version = version + 1")
    return created


def _partition_bounds(conn: sqlite3.Connection, topic: str) -> dict[int, tuple[int, int]]:
    """Per partition, (log start, log end); empty for an unknown topic, as on Kafka."""
    rows = conn.execute(
        "SELECT part, log_start, log_end FROM partitions WHERE topic = ? ORDER BY part", (topic,)
    )
    return {p: (start, end) for p, start, end in rows}


def _offsets_for_time(conn: sqlite3.Connection, topic: str, timestamp_ms: int) -> dict[int, int]:
    result: dict[int, int] = {}
    for part, (_, end) in _partition_bounds(conn, topic).items():
        row = conn.execute(
            "SELECT min(record_offset) FROM records WHERE topic = ? AND part = ? AND timestamp_ms >= ?",
            (topic, part, timestamp_ms),
        ).fetchone()
        result[part] = end if row[0] is None else row[0]
    return result
