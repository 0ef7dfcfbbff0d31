"""The fetch-state store: a SQLite mirror of the compacted fetch-state topic, one row per (mailbox, UIDL),
with the next changelog offset to read per partition (the checkpoint).

Kafka Streams' model (CONVENTIONS "Faults and bounds"): the state is on disk, queried per mailbox, and
brought up to date from the changelog's tail, never rebuilt in memory from the whole history. The topic
stays the source of truth; the file is a cache that can be deleted at any time (it is then rebuilt from
the topic once). Embedded mode keeps the same tables inside the embedded log's own file.

Why a mirror of the whole topic rather than per-mailbox reads of the topic: the topic is keyed
`mailbox\\0uidl` (schemas.events.fetch_state_key), so one mailbox's records are spread over all of its
partitions; no partition read selects one mailbox. The mirror holds every mailbox's rows on disk, and a
replica reads from it only the mailboxes it polls, one pass at a time.

Ordering: each row keeps the (partition, offset) of the record it holds and is replaced only by a record
with a higher offset, so a record this replica just wrote (`remember`) is never overwritten by an older
one that a catch-up reads later. The checkpoint moves only with the rows read from the changelog, in one
transaction: a crash leaves the file consistent, and the tail is read again.

`FetchStateStore` is sync; `FetchMemory` runs it on its own thread and catches it up with the changelog
(what to read: services.fetcher.memory). Memory is bounded whatever the history: the store's page cache,
plus the rows of the UIDLs listed in the sessions in progress (at most `max_parallel_mailboxes`).
Opening, a corrupt file, transactions and the checkpoint table are the shared ones of every local state
store (services.runtime.sqlite_state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

from schemas import codec
from schemas.events import FetchRecorded
from services.fetcher.memory import chunks, tail_ranges
from services.runtime import sqlite_state
from services.runtime.log import Record, Written

T = TypeVar("T")
_log = logging.getLogger("popbridge.fetcher")

# SQLite page cache of this connection (negative: KiB): the memory bound of the store, whatever its size.
CACHE_KIB = 16 * 1024
_IN_CHUNK = 500  # UIDLs per query: under SQLite's oldest limit of 999 parameters

# One row per key of the topic: what plan_pass needs per UIDL, decoded from `value` when read.
_TABLE = """CREATE TABLE IF NOT EXISTS fetch_state (
    topic TEXT NOT NULL, mailbox_id TEXT NOT NULL, uidl TEXT NOT NULL, part INTEGER NOT NULL,
    record_offset INTEGER NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (topic, mailbox_id, uidl)) WITHOUT ROWID"""
CHECKPOINTS = "fetch_state_checkpoint"

# A newer record of a key replaces an older one; an older one read late never replaces a newer one.
_UPSERT = """INSERT INTO fetch_state (topic, mailbox_id, uidl, part, record_offset, value)
    VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (topic, mailbox_id, uidl) DO UPDATE SET
        part = excluded.part, record_offset = excluded.record_offset, value = excluded.value
    WHERE excluded.record_offset > fetch_state.record_offset OR excluded.part != fetch_state.part"""


def create_fetch_state_tables(conn: sqlite3.Connection) -> None:
    """The fetch-state tables, in a file of their own or in the embedded log's file (idempotent)."""
    conn.execute(_TABLE)
    sqlite_state.create_checkpoint_table(conn, CHECKPOINTS)


Row = tuple[int, int, bytes]  # (partition, offset, encoded FetchRecorded)


class FetchStateStore:
    """The fetch-state tables of one SQLite file. Not thread-safe: one thread uses it at a time.

    `dedicated`: a file of its own (Kafka mode), deleted and rebuilt from the changelog when it is
    corrupt; False: the embedded log's file, whose corruption is the log's to report."""

    def __init__(self, path: Path, *, dedicated: bool = False) -> None:
        self._conn = (
            sqlite_state.open_or_rebuild(path, _open, "fetch state", log=_log) if dedicated else _open(path)
        )

    def close(self) -> None:
        self._conn.close()

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return sqlite_state.transaction(self._conn)

    def known(
        self, topic: str, mailbox_id: str, uidls: Iterable[str] | None = None, *, content_keys: bool = False
    ) -> dict[str, FetchRecorded]:
        """UIDL -> latest FetchRecorded of one mailbox: all of them, or those of `uidls` (what the server
        lists now: memory follows the listing, not the history) plus, with `content_keys`, the keys of
        messages identified by content (services.fetcher.plan.content_key: they start with "~")."""
        select = "SELECT uidl, value FROM fetch_state WHERE topic = ? AND mailbox_id = ?"
        if uidls is None:
            return self._decoded(select, (topic, mailbox_id))
        found: dict[str, FetchRecorded] = {}
        wanted = list(uidls)
        for start in range(0, len(wanted), _IN_CHUNK):  # point reads of the primary key
            chunk = wanted[start : start + _IN_CHUNK]
            # Only "?" placeholders are joined into the text; the values are bound.
            query = select + " AND uidl IN (" + ",".join("?" * len(chunk)) + ")"
            found |= self._decoded(query, (topic, mailbox_id, *chunk))
        if content_keys:
            found |= self._decoded(select + " AND uidl >= '~'", (topic, mailbox_id))
        return found

    def _decoded(self, query: str, parameters: tuple[str, ...]) -> dict[str, FetchRecorded]:
        rows = self._conn.execute(query, parameters)
        return {uidl: codec.decode(value, FetchRecorded) for uidl, value in rows}

    def checkpoint(self, topic: str) -> dict[int, int]:
        """Per partition, the next changelog offset to read."""
        return sqlite_state.checkpoints(self._conn, CHECKPOINTS, topic)

    def apply(self, topic: str, rows: Iterable[Row], checkpoint: Mapping[int, int] | None = None) -> int:
        """Upsert records (changelog order or not) and, in the same transaction, move the checkpoint."""
        values = [(topic, *_identity(value), part, offset, value) for part, offset, value in rows]
        with self._transaction():
            self._conn.executemany(_UPSERT, values)
            for part, next_offset in (checkpoint or {}).items():
                sqlite_state.set_checkpoint(self._conn, CHECKPOINTS, topic, part, next_offset)
        return len(values)

    def forget(self, topic: str) -> None:
        """Drop the mirror of `topic` (the topic was recreated: its offsets start again)."""
        with self._transaction():
            self._conn.execute("DELETE FROM fetch_state WHERE topic = ?", (topic,))
            self._conn.execute(f"DELETE FROM {CHECKPOINTS} WHERE topic = ?", (topic,))  # noqa: S608 - a constant


def _open(path: Path) -> sqlite3.Connection:
    # synchronous NORMAL: a cache of the changelog, a write lost to a power cut is read again from the topic.
    return sqlite_state.open_state_file(
        path, _prepare, synchronous="NORMAL", cache_kib=CACHE_KIB, check_same_thread=False
    )


def _prepare(conn: sqlite3.Connection) -> None:
    with sqlite_state.transaction(conn):
        create_fetch_state_tables(conn)
    conn.execute(f"SELECT count(*) FROM {CHECKPOINTS}").fetchone()  # noqa: S608 - reads a page: damage fails here


def _identity(value: bytes) -> tuple[str, str]:
    record = codec.decode(value, FetchRecorded)
    return record.mailbox_id, record.uidl


class ChangelogReader(Protocol):
    """What a catch-up needs of the log (KafkaLog and EmbeddedLog have it)."""

    async def end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset the next record written will get."""
        ...

    async def read(self, topic: str, partition: int, start: int, end: int) -> list[Record]:
        """The records of one partition with `start <= offset < end` (compaction leaves gaps)."""
        ...


class FetchMemory:
    """Per mailbox, UIDL -> the latest FetchRecorded, on disk. `catch_up` reads the changelog's tail;
    `remember` stores what this fetcher just wrote (durable in the log already)."""

    def __init__(self, store: FetchStateStore, log_: ChangelogReader, topic: str) -> None:
        self._store = store
        self._log = log_
        self._topic = topic
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="fetch-state")  # the store's one thread
        self._catching_up = asyncio.Lock()
        self.last_catch_up = 0  # records the last catch-up read (at a restart: the tail)

    async def _run(self, fn: partial[T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def known(
        self, mailbox_id: str, uidls: Iterable[str] | None = None, *, content_keys: bool = False
    ) -> dict[str, FetchRecorded]:
        """What `mailbox_id` published: every UIDL, or only `uidls` (see FetchStateStore.known)."""
        wanted = None if uidls is None else list(uidls)
        return await self._run(
            partial(self._store.known, self._topic, mailbox_id, wanted, content_keys=content_keys)
        )

    async def remember(self, written: Sequence[tuple[FetchRecorded, Written]]) -> None:
        rows = [(w.partition, w.offset, codec.encode(r)) for r, w in written]
        await self._run(partial(self._store.apply, self._topic, rows))

    async def catch_up(self) -> int:
        """Read the changelog from the checkpoint to its end now; returns how many records were read."""
        async with self._catching_up:
            ends = await self._log.end_offsets(self._topic)
            checkpoint: dict[int, int] = await self._run(partial(self._store.checkpoint, self._topic))
            ranges = tail_ranges(checkpoint, ends)
            if ranges is None:
                await self._run(partial(self._store.forget, self._topic))
                ranges = tail_ranges({}, ends) or {}
            count = 0
            for part, (start, end) in sorted(ranges.items()):
                for low, high in chunks(start, end):
                    records = await self._log.read(self._topic, part, low, high)
                    rows: list[Row] = [(r.partition, r.offset, r.value) for r in records]
                    count += await self._run(partial(self._store.apply, self._topic, rows, {part: high}))
            self.last_catch_up = count
            return count

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self._store.close()


def store_path(log_: object, data_dir: str) -> Path | None:
    """Where the store lives: in the embedded log's own file; else `<data_dir>/fetch-state.sqlite3`;
    else None (a temporary file, read again from the whole changelog at every start)."""
    embedded = getattr(log_, "path", None)
    if isinstance(embedded, Path):
        return embedded
    return Path(data_dir).expanduser() / "fetch-state.sqlite3" if data_dir else None


@contextlib.asynccontextmanager
async def open_memory(log_: ChangelogReader, topic: str, path: Path | None) -> AsyncIterator[FetchMemory]:
    """The fetcher's memory in `path` (a temporary directory when None), caught up with the changelog."""
    with contextlib.ExitStack() as stack:
        if path is None:
            path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="popbridge-fetch-state-")))
            path /= "fetch-state.sqlite3"
        dedicated = path != getattr(log_, "path", None)  # not the embedded log's own file (store_path)
        memory = FetchMemory(FetchStateStore(path, dedicated=dedicated), log_, topic)
        try:
            read = await memory.catch_up()
            _log.info("fetch state: %d records read from the changelog since the checkpoint", read)
            yield memory
        finally:
            memory.close()
