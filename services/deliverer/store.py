"""The deliverer's local state: the delivered pairs of the ledger partitions it owns, in SQLite on disk.

The ledger topic is the changelog, this store a cache of it (Kafka Streams' state store): per ledger
partition it keeps the pairs read so far and a checkpoint, the offset of the next changelog record to
apply. A replica that restarts, or is given a partition, reads only the changelog from the checkpoint on.
Each batch asks it about single pairs (a primary-key lookup); nothing is ever loaded whole, and SQLite's
page cache is bounded (CACHE_KIB), so the process's memory does not grow with the history.

Why SQLite (README "Decisions"): in the standard library, an indexed on-disk table with atomic
transactions (a checkpoint moves with the pairs it covers, or not at all), one file to size and delete,
and the embedded log is SQLite already: there the ledger is one more table in the log's own file.

Durability: the store may lose its last transactions in a power cut (`synchronous=NORMAL`): the changelog
has them, and the checkpoint is lost with them (one transaction), so a restore reads them again.

Opening, corruption, transactions, errors and the checkpoint table are the shared ones of every local
state store (services.runtime.sqlite_state).

Errors:
    LogError (services.runtime.log)
    └── StateStoreError     not retriable: the disk is full (SQLITE_FULL), or the store cannot be opened
    A corrupt dedicated state file is not an error: it is deleted with a warning and rebuilt from the
    changelog (`open_store`).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path

from services.runtime import sqlite_state
from services.runtime.sqlite_state import StateStoreError

__all__ = [  # StateStoreError is the shared one, named here too: it is what this store raises
    "CACHE_KIB", "CHECKPOINTS", "STATE_FILE", "LedgerStore", "Pair", "StateStoreError",
    "ensure_ledger_tables", "open_store", "store_error",
]

logger = logging.getLogger(__name__)

CACHE_KIB = 32 * 1024  # SQLite's page cache for the store: what it holds in memory, whatever the history
STATE_FILE = "deliverer-ledger.sqlite3"
CHECKPOINTS = "deliverer_ledger_checkpoints"
_WHAT = "deliverer state"  # how errors and warnings name the file

Pair = tuple[str, str, int]
"""(fetch id, recipient, delivered at in ms since the epoch)."""


def ensure_ledger_tables(conn: sqlite3.Connection) -> None:
    """The ledger's tables, created if missing. Their own names, and no `user_version`: in embedded mode
    they live in the log's file beside the log's tables, which this leaves alone."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS deliverer_ledger (fetch_id TEXT NOT NULL, recipient TEXT NOT NULL,"
        " part INTEGER NOT NULL, delivered_ms INTEGER NOT NULL, PRIMARY KEY (fetch_id, recipient))"
        " WITHOUT ROWID"
    )
    # No index by time: a restore inserts in key order, and index entries in time order would land on random
    # pages of it, rewriting the index once per bucket (`merge_staged`); `expire` scans the table instead.
    conn.execute("DROP INDEX IF EXISTS deliverer_ledger_by_time")  # a store from before: dropped in place
    # A restore's pairs, appended per bucket (the fetch id's first two characters) in arrival order, before
    # they go into deliverer_ledger one bucket at a time in key order (`stage`, `merge_staged`).
    conn.execute(
        "CREATE TABLE IF NOT EXISTS deliverer_ledger_staged (bucket TEXT NOT NULL, seq INTEGER NOT NULL,"
        " fetch_id TEXT NOT NULL, recipient TEXT NOT NULL, part INTEGER NOT NULL,"
        " delivered_ms INTEGER NOT NULL, PRIMARY KEY (bucket, seq)) WITHOUT ROWID"
    )
    sqlite_state.create_checkpoint_table(conn, CHECKPOINTS)


class LedgerStore:
    """The delivered pairs and, per changelog partition, the offset of the next record to apply."""

    def __init__(self, conn: sqlite3.Connection, path: Path, topic: str) -> None:
        self._conn = conn
        self.path = path
        self.topic = topic
        self._seq: int | None = None  # the next staged pair's sequence number (None: not asked yet)

    def close(self) -> None:
        self._conn.close()

    def delivered(self, fetch_id: str, recipient: str) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM deliverer_ledger WHERE fetch_id = ? AND recipient = ?", (fetch_id, recipient)
        ).fetchone()
        return row is not None

    def checkpoint(self, partition: int) -> int:
        """The next changelog offset to apply for `partition` (0: nothing applied yet)."""
        return sqlite_state.checkpoint(self._conn, CHECKPOINTS, self.topic, partition)

    def apply(self, partition: int, pairs: Iterable[Pair], next_offset: int) -> None:
        """Changelog records up to `next_offset` (exclusive) read: their pairs and the checkpoint, at once."""
        with self._transaction():
            self._insert(partition, pairs)
            self._set_checkpoint(partition, next_offset)

    def stage(self, partition: int, pairs: Iterable[Pair], next_offset: int) -> None:
        """As `apply`, for a restore: the pairs are staged (appended, whatever their keys), not yet visible
        to `delivered` until `merge_staged`. The checkpoint moves with them: staged pairs are the store's,
        and a store opened with pairs staged merges them first, so a crash loses none of them."""
        staged = list(pairs)
        with self._transaction():
            self._conn.executemany(
                "INSERT INTO deliverer_ledger_staged VALUES (substr(?1, 1, 2), ?2, ?1, ?3, ?4, ?5)",
                ((fetch_id, seq, recipient, partition, at)
                 for seq, (fetch_id, recipient, at) in enumerate(staged, self._next_seq())),
            )
            self._set_checkpoint(partition, next_offset)
        self._seq = self._next_seq() + len(staged)

    def merge_staged(self) -> int:
        """The staged pairs into the table, bucket by bucket in key order; how many were staged.

        Inserted in key order, the pairs of a restore write each page of the table once, whatever its
        size (the table and the staged pairs are both in key order), where inserting chunks of random
        fetch ids rewrites nearly every page once per chunk as soon as the table outgrows the page cache
        (bench/scale_deliverer.py). A bucket is ~1/256 of the staged pairs: SQLite sorts it in memory.
        One transaction a bucket keeps the WAL small; a crash in between merges them again (INSERT OR
        IGNORE) on the next open, and the staged pairs go in one last transaction."""
        buckets = [b for (b,) in self._conn.execute("SELECT DISTINCT bucket FROM deliverer_ledger_staged")]
        for bucket in buckets:
            with self._transaction():
                self._conn.execute(
                    "INSERT OR IGNORE INTO deliverer_ledger SELECT fetch_id, recipient, part, delivered_ms"
                    " FROM deliverer_ledger_staged WHERE bucket = ? ORDER BY fetch_id, recipient", (bucket,)
                )
        with self._transaction():
            cursor = self._conn.execute("DELETE FROM deliverer_ledger_staged")
        return cursor.rowcount

    def _next_seq(self) -> int:
        """Past every staged pair's: asked of the table once (a scan: seq is not its first key column)."""
        if self._seq is None:
            row = self._conn.execute("SELECT max(seq) FROM deliverer_ledger_staged").fetchone()
            self._seq = 0 if row[0] is None else int(row[0]) + 1
        return self._seq

    def record(self, partition: int, pairs: Sequence[Pair], offsets: Sequence[int]) -> None:
        """Pairs this replica just wrote to the changelog at `offsets`. The checkpoint follows only where
        they continue it without a gap: a record another writer put in between is applied by a restore."""
        with self._transaction():
            self._insert(partition, pairs)
            for offset in sorted(offsets):
                self._conn.execute(
                    "UPDATE deliverer_ledger_checkpoints SET next_offset = ? WHERE topic = ? AND part = ?"
                    " AND next_offset = ?", (offset + 1, self.topic, partition, offset),
                )

    def reset(self, partition: int) -> None:
        """Forget the checkpoint (the changelog was recreated): the next restore reads it from its start."""
        with self._transaction():
            self._set_checkpoint(partition, 0)

    def expire(self, before_ms: int) -> int:
        """Delete the pairs delivered before `before_ms` (the changelog's retention); how many went."""
        with self._transaction():
            cursor = self._conn.execute("DELETE FROM deliverer_ledger WHERE delivered_ms < ?", (before_ms,))
        return cursor.rowcount

    def count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM deliverer_ledger").fetchone()[0])

    def _insert(self, partition: int, pairs: Iterable[Pair]) -> None:
        # In key order: neighbouring pairs share pages, each written once (a restore stages instead).
        self._conn.executemany(
            "INSERT OR IGNORE INTO deliverer_ledger VALUES (?, ?, ?, ?)",
            ((fetch_id, recipient, partition, at) for fetch_id, recipient, at in sorted(pairs)),
        )

    def _set_checkpoint(self, partition: int, next_offset: int) -> None:
        sqlite_state.set_checkpoint(self._conn, CHECKPOINTS, self.topic, partition, next_offset)

    def _transaction(self) -> AbstractContextManager[None]:
        """SQLite errors inside become StateStoreError (one line naming the file)."""
        return sqlite_state.transaction(self._conn, partial(store_error, path=self.path))


def store_error(exc: sqlite3.Error, path: Path) -> StateStoreError:
    return sqlite_state.state_error(exc, path, _WHAT)


def open_store(path: Path, topic: str, *, dedicated: bool = True) -> LedgerStore:
    """The store in `path`. `dedicated`: a file of its own (Kafka mode), deleted and rebuilt from the
    changelog when it is corrupt; False: the embedded log's file, whose corruption is the log's to report."""
    try:
        if dedicated:
            conn = sqlite_state.open_or_rebuild(path, _connect, _WHAT, log=logger)
        else:
            conn = _connect(path)
    except sqlite3.Error as exc:
        raise store_error(exc, path) from exc
    store = LedgerStore(conn, path, topic)
    leftover = store.merge_staged()  # a restore cut short: its checkpoints cover these pairs
    if leftover:
        logger.info("deliverer state %s: %d pairs staged by an interrupted restore merged", path, leftover)
    return store


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite_state.open_state_file(path, _prepare, synchronous="NORMAL", cache_kib=CACHE_KIB)


def _prepare(conn: sqlite3.Connection) -> None:
    ensure_ledger_tables(conn)
    # Reads the schema and the checkpoints (a few pages). Not `PRAGMA quick_check`: it reads every page,
    # seconds for a large ledger on every start; damage found later is handled where it is met.
    conn.execute(f"SELECT count(*) FROM {CHECKPOINTS}").fetchone()  # noqa: S608 - a constant name
