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

Sync and I/O-bound: `services.fetcher.memory` runs it on its own thread.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from schemas import codec
from schemas.events import FetchRecorded

_BUSY_TIMEOUT = 30.0  # seconds a write waits for another connection (embedded: the log's own writers)
# SQLite page cache of this connection (negative: KiB): the memory bound of the store, whatever its size.
CACHE_KIB = 16 * 1024
_IN_CHUNK = 500  # UIDLs per query: under SQLite's oldest limit of 999 parameters

_TABLES = (
    # One row per key of the topic: what plan_pass needs per UIDL, decoded from `value` when read.
    """CREATE TABLE IF NOT EXISTS fetch_state (
        topic TEXT NOT NULL, mailbox_id TEXT NOT NULL, uidl TEXT NOT NULL, part INTEGER NOT NULL,
        record_offset INTEGER NOT NULL, value BLOB NOT NULL,
        PRIMARY KEY (topic, mailbox_id, uidl)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS fetch_state_checkpoint (
        topic TEXT NOT NULL, part INTEGER NOT NULL, next_offset INTEGER NOT NULL,
        PRIMARY KEY (topic, part)) WITHOUT ROWID""",
)

# A newer record of a key replaces an older one; an older one read late never replaces a newer one.
_UPSERT = """INSERT INTO fetch_state (topic, mailbox_id, uidl, part, record_offset, value)
    VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (topic, mailbox_id, uidl) DO UPDATE SET
        part = excluded.part, record_offset = excluded.record_offset, value = excluded.value
    WHERE excluded.record_offset > fetch_state.record_offset OR excluded.part != fetch_state.part"""


def create_fetch_state_tables(conn: sqlite3.Connection) -> None:
    """The fetch-state tables, in a file of their own or in the embedded log's file (idempotent)."""
    for statement in _TABLES:
        conn.execute(statement)


Row = tuple[int, int, bytes]  # (partition, offset, encoded FetchRecorded)


class FetchStateStore:
    """The fetch-state tables of one SQLite file. Not thread-safe: one thread uses it at a time."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(
            path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        try:
            self._conn.execute("PRAGMA journal_mode = WAL")
            # A cache of the changelog: a write lost to a power cut is read again from the topic.
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            with self._transaction():
                create_fetch_state_tables(self._conn)
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._conn.execute("COMMIT")
        finally:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")

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
        rows = self._conn.execute(
            "SELECT part, next_offset FROM fetch_state_checkpoint WHERE topic = ?", (topic,)
        )
        return dict(rows.fetchall())

    def apply(self, topic: str, rows: Iterable[Row], checkpoint: Mapping[int, int] | None = None) -> int:
        """Upsert records (changelog order or not) and, in the same transaction, move the checkpoint."""
        values = [(topic, *_identity(value), part, offset, value) for part, offset, value in rows]
        with self._transaction():
            self._conn.executemany(_UPSERT, values)
            for part, next_offset in (checkpoint or {}).items():
                self._conn.execute(
                    "INSERT OR REPLACE INTO fetch_state_checkpoint (topic, part, next_offset) "
                    "VALUES (?, ?, ?)",
                    (topic, part, next_offset),
                )
        return len(values)

    def forget(self, topic: str) -> None:
        """Drop the mirror of `topic` (the topic was recreated: its offsets start again)."""
        with self._transaction():
            self._conn.execute("DELETE FROM fetch_state WHERE topic = ?", (topic,))
            self._conn.execute("DELETE FROM fetch_state_checkpoint WHERE topic = ?", (topic,))


def _identity(value: bytes) -> tuple[str, str]:
    record = codec.decode(value, FetchRecorded)
    return record.mailbox_id, record.uidl
