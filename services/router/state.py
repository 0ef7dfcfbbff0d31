"""The faust router's dedupe table on local disk: a faust Store on SQLite, one file per changelog partition,
with the changelog offset applied so far, and the expiry that deletes entries past the window.

The Kafka Streams model (CONVENTIONS.md, "Faults and bounds"): the compacted changelog topic is the
durable copy; each replica keeps the partitions assigned to it in `<directory>/<changelog>-<p>.sqlite3`.
faust's own Recovery does the rest: on assignment it asks `persisted_offset` and reads the changelog
from there to its end before the agents get the partition, so a restart reads only the tail, and a
partition new to this replica (or whose file was deleted) is read from the start. The offset is
written as faust's at-least-once mode does: by `set_persisted_offset` when the broker acknowledged a
changelog record, and with each restored batch (in the batch's transaction).

Why our own store and not faust's `rocksdb://`: see README "Decisions" (router state). In short, an
indexed expiry, connections closed on revocation and stop (faust's RocksDB store leaves that to the
garbage collector, so an in-process restart of the app can find the partition's lock still held),
bounded memory by default, and no native dependency.

The local file may hold a change the changelog lacks (written just before a kill, its changelog record
never acknowledged). That is harmless: such a change belongs to a record whose input offset is not
committed either, so the record is routed again, by its own fetch id, which dedupe never suppresses.

A file SQLite finds corrupt or not a database is deleted with a warning, and the partition is rebuilt
from the changelog. Opening, that, and transactions are the shared ones of every local state store
(services.runtime.sqlite_state).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import faust
import msgspec
from faust.stores.base import SerializedStore
from faust.streams import current_event
from faust.types import TP, EventT

from services.router.dedupe import DEFAULT_WINDOW, decode_seen, encode_seen, oldest_seen, prune
from services.runtime import sqlite_state, state_table

log = logging.getLogger("popbridge.router")

TABLE = "seen_copies"  # the table's name inside each partition file
EXPIRE_EVERY = 60.0  # seconds between two expiry passes
EXPIRE_BATCH = 1000  # entries pruned per partition and pass: 1.4M a day at 6 partitions, far above the intake
_PAGE = 500  # entries per read when iterating a partition
WAL_LIMIT = 8 * 1024 * 1024  # bytes the write-ahead log is truncated back to after a checkpoint

PruneAt = Callable[[bytes], int]  # a stored value -> when it next needs pruning (epoch ms)


def prune_at_ms(window: timedelta) -> PruneAt:
    """When an encoded dedupe entry next needs pruning: its oldest body's first sighting plus `window`."""

    def prune_at(value: bytes) -> int:
        try:
            oldest = oldest_seen(decode_seen(value))
        except msgspec.DecodeError:
            return 0  # unreadable: due at once, and expiry deletes it
        return 0 if oldest is None else int((oldest + window).timestamp() * 1000)

    return prune_at


def open_partition_file(path: Path) -> sqlite3.Connection:
    """The SQLite file of one partition, created when missing (0600 in a 0700 directory: Message-IDs and
    addresses); a corrupt one is deleted (with a warning) and started afresh, so the partition is
    restored from the changelog."""
    return sqlite_state.open_or_rebuild(path, _open, "router state", log=log)


def _open(path: Path) -> sqlite3.Connection:
    # NORMAL: a committed write survives a kill of the process (the WAL is in the kernel's pages); a
    # power cut may lose the last ones, changes and offset together, and the changelog has them.
    return sqlite_state.open_state_file(
        path, _prepare, synchronous="NORMAL", journal_size_limit=WAL_LIMIT, check_same_thread=False
    )


def _prepare(conn: sqlite3.Connection) -> None:
    state_table.create_table(conn, TABLE)
    state_table.applied_offset(conn, TABLE, 0)  # reads a page: a damaged file fails here, not later


class SeenCopiesStore(SerializedStore[bytes, bytes]):
    """faust's Store interface over one SQLite file per changelog partition (see the module docstring).

    Reads and writes in an agent go to the partition of the event being handled (the table is
    co-partitioned with its input); elsewhere (tests, iteration) to every open partition."""

    def __init__(self, *args: Any, directory: Path, prune_at: PruneAt, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.directory = directory
        self.prune_at = prune_at
        self._files: dict[int, sqlite3.Connection] = {}

    # --- files ------------------------------------------------------------------------------------

    def partition_path(self, partition: int) -> Path:
        return self.directory / f"{self.table.changelog_topic.get_topic_name()}-{partition}.sqlite3"

    def _file(self, partition: int) -> sqlite3.Connection:
        conn = self._files.get(partition)
        if conn is None:
            conn = self._files[partition] = open_partition_file(self.partition_path(partition))
        return conn

    def _close(self, partition: int) -> None:
        conn = self._files.pop(partition, None)
        if conn is not None:
            conn.close()

    def _event_partition(self) -> int | None:
        event = current_event()
        return None if event is None else int(event.message.partition)

    def _partitions_for(self) -> list[int]:
        partition = self._event_partition()
        return list(self._files) if partition is None else [partition]

    # --- the offset checkpoint ----------------------------------------------------------------------

    def persisted_offset(self, tp: TP) -> int | None:
        return state_table.applied_offset(self._file(tp.partition), TABLE, tp.partition)

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        state_table.set_applied_offset(self._file(tp.partition), TABLE, tp.partition, offset)

    def apply_changelog_batch(
        self, batch: Iterable[EventT[Any]], to_key: Callable[[Any], Any], to_value: Callable[[Any], Any]
    ) -> None:
        """Restore: each partition's changes and its new offset in one transaction."""
        changes: dict[int, list[state_table.Change]] = {}
        offsets: dict[int, int] = {}
        for event in batch:
            message = event.message
            if message.key is None:
                continue  # faust's changelog records always have one; nothing to apply otherwise
            value = message.value
            prune = 0 if value is None else self.prune_at(value)
            changes.setdefault(message.partition, []).append((message.key, value, prune))
            offsets[message.partition] = max(message.offset, offsets.get(message.partition, -1))
        for partition, partition_changes in changes.items():
            conn = self._file(partition)
            with sqlite_state.transaction(conn):
                state_table.write(conn, TABLE, partition_changes)
                state_table.set_applied_offset(conn, TABLE, partition, offsets[partition])

    # --- faust's SerializedStore ------------------------------------------------------------------

    def _get(self, key: bytes) -> bytes | None:
        for partition in self._partitions_for():
            value = state_table.get(self._file(partition), TABLE, key)
            if value is not None:
                return value
        return None

    def _set(self, key: bytes, value: bytes | None) -> None:
        partition = self._event_partition()
        if partition is None:
            raise TypeError("the router's dedupe table is written only while handling an event")
        self.write(partition, [(key, value, 0 if value is None else self.prune_at(value))])

    def _del(self, key: bytes) -> None:
        for partition in self._partitions_for():
            self.write(partition, [(key, None, 0)])

    def _iteritems(self) -> Iterator[tuple[bytes, bytes]]:
        for partition in list(self._files):
            after = b""
            while page := state_table.keys(self._file(partition), TABLE, after, _PAGE):
                yield from page
                after = page[-1][0]

    def _iterkeys(self) -> Iterator[bytes]:
        for key, _ in self._iteritems():
            yield key

    def _itervalues(self) -> Iterator[bytes]:
        for _, value in self._iteritems():
            yield value

    def _size(self) -> int:
        return sum(state_table.count(self._file(p), TABLE) for p in list(self._files))

    def _contains(self, key: bytes) -> bool:
        return self._get(key) is not None

    def _clear(self) -> None:
        for partition in list(self._files):
            conn = self._file(partition)
            with sqlite_state.transaction(conn):
                state_table.clear(conn, TABLE)

    # --- used by expiry and tests -------------------------------------------------------------------

    def write(self, partition: int, changes: Iterable[state_table.Change]) -> None:
        state_table.write(self._file(partition), TABLE, changes)

    def due(self, partition: int, now_ms: int, limit: int) -> list[state_table.KeyValue]:
        return state_table.due(self._file(partition), TABLE, now_ms, limit)

    def count(self, partition: int) -> int:
        return state_table.count(self._file(partition), TABLE)

    async def backup_partition(self, tp: TP | int, flush: bool = True, purge: bool = False,
                               keep: int = 1) -> None:  # fmt: skip
        raise NotImplementedError("the changelog is the backup")

    def restore_backup(self, tp: TP | int, latest: bool = True, backup_id: int = 0) -> None:
        raise NotImplementedError("the changelog is the backup")

    # --- lifecycle ----------------------------------------------------------------------------------

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP], generation_id: int = 0
    ) -> None:
        """Close the files of revoked partitions (kept on disk: if the partition comes back, only the
        changelog written meanwhile is read). New ones open when faust first asks for their offset."""
        for tp in revoked:
            if tp.topic in self.table.changelog_topic.topics:
                self._close(tp.partition)

    async def stop(self) -> None:
        for partition in list(self._files):
            self._close(partition)
        await super().stop()

    def reset_state(self) -> None:
        """Delete this table's local files (faust's `reset` asks for it); the changelog keeps everything."""
        for partition in list(self._files):
            self._close(partition)
        for path in self.directory.glob(f"{self.table.changelog_topic.get_topic_name()}-*.sqlite3*"):
            path.unlink(missing_ok=True)


class SeenCopiesTable(faust.Table[bytes, bytes]):
    """faust's Table whose store is SeenCopiesStore (faust builds stores from a URL registry; this
    passes ours the directory and the expiry function instead)."""

    def __init__(self, *args: Any, directory: Path, prune_at: PruneAt, **kwargs: Any) -> None:
        self._state_directory = directory
        self._prune_at = prune_at
        super().__init__(*args, **kwargs)

    def _new_store(self) -> SeenCopiesStore:
        return SeenCopiesStore(
            "popbridge-sqlite://", self.app, self, table_name=self.name, key_type=self.key_type,
            key_serializer=self.key_serializer, value_serializer=self.value_serializer,
            value_type=self.value_type, loop=self.loop, options=self.options,
            directory=self._state_directory, prune_at=self._prune_at,
        )

    @property
    def store(self) -> SeenCopiesStore:
        data = self.data
        assert isinstance(data, SeenCopiesStore)  # _new_store builds no other
        return data


def expire_partition(
    table: SeenCopiesTable, partition: int, now: datetime, window: timedelta = DEFAULT_WINDOW,
    limit: int = EXPIRE_BATCH,
) -> int:
    """Prune up to `limit` due entries of one partition: bodies past the window are dropped, an entry left
    empty is deleted, locally and in the changelog (a tombstone, so a cold restore skips it and
    compaction removes it). Returns how many entries were deleted."""
    store = table.store
    deleted = 0
    for key, value in store.due(partition, int(now.timestamp() * 1000), limit):
        try:
            fresh = prune(decode_seen(value), now, window)
        except msgspec.DecodeError:
            fresh = {}
        new = encode_seen(fresh) if fresh else None
        store.write(partition, [(key, new, 0 if new is None else store.prune_at(new))])
        table.send_changelog(partition, key, new)
        deleted += new is None
    return deleted
