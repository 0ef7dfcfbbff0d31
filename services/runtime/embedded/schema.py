"""The embedded log's SQLite schema and connections: the tables and their version, opening a connection
(WAL, `synchronous`, the schema created on first use), one transaction, and the error type.

Errors:
    LogError
    └── EmbeddedLogError   `retriable` when SQLite was busy or the disk full; not retriable for an
                           unknown topic, a record too large, a keyless record on a compacted topic,
                           moving the offsets of a live group, a database from a newer popbridge
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from schemas.topics import MAX_MESSAGE_BYTES
from services.runtime.embedded.files import create_private
from services.runtime.log import LogError

SCHEMA_VERSION = 1
_BUSY_TIMEOUT = 30.0  # seconds a writer waits for another connection's write transaction

Synchronous = Literal["FULL", "NORMAL"]

_SCHEMA = (
    "CREATE TABLE topics (name TEXT PRIMARY KEY, partitions INTEGER NOT NULL, config TEXT NOT NULL)",
    # log_end is the next offset to assign; it survives the deletion of the records before it.
    """CREATE TABLE partitions (
        topic TEXT NOT NULL, part INTEGER NOT NULL, log_start INTEGER NOT NULL DEFAULT 0,
        log_end INTEGER NOT NULL DEFAULT 0, last_ms INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (topic, part)) WITHOUT ROWID""",
    # value comes last so that reading the other columns never touches its overflow pages.
    """CREATE TABLE records (
        id INTEGER PRIMARY KEY, topic TEXT NOT NULL, part INTEGER NOT NULL, record_offset INTEGER NOT NULL,
        timestamp_ms INTEGER NOT NULL, key BLOB, value BLOB NOT NULL, UNIQUE (topic, part, record_offset))""",
    "CREATE INDEX records_by_time ON records (topic, part, timestamp_ms)",
    """CREATE TABLE committed (
        group_id TEXT NOT NULL, topic TEXT NOT NULL, part INTEGER NOT NULL, next_offset INTEGER NOT NULL,
        PRIMARY KEY (group_id, topic, part)) WITHOUT ROWID""",
    # version changes whenever membership or ownership changes: members re-sync when they see it move.
    "CREATE TABLE groups (group_id TEXT PRIMARY KEY, version INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID",
    """CREATE TABLE members (
        group_id TEXT NOT NULL, member_id TEXT NOT NULL, client TEXT NOT NULL, topics TEXT NOT NULL,
        heartbeat_ms INTEGER NOT NULL, PRIMARY KEY (group_id, member_id)) WITHOUT ROWID""",
    """CREATE TABLE owners (
        group_id TEXT NOT NULL, topic TEXT NOT NULL, part INTEGER NOT NULL, member_id TEXT NOT NULL,
        PRIMARY KEY (group_id, topic, part)) WITHOUT ROWID""",
)


class EmbeddedLogError(LogError):
    """The embedded log could not do what was asked; `retriable` says whether trying later can help."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


def connect(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    create_private(path)
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on a new, empty database
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL" if synchronous == "FULL" else "PRAGMA synchronous = NORMAL")
        # Truncate the WAL back to this size after a checkpoint, or one 50 MB mail leaves a 50 MB WAL behind.
        conn.execute(f"PRAGMA journal_size_limit = {2 * MAX_MESSAGE_BYTES}")
        _ensure_schema(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _user_version(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return version


def _ensure_schema(conn: sqlite3.Connection) -> None:
    if _user_version(conn) == SCHEMA_VERSION:
        return
    with transaction(conn):
        version = _user_version(conn)
        if version > SCHEMA_VERSION:
            raise EmbeddedLogError(
                f"the embedded log was written by a newer popbridge (schema {version})", retriable=False
            )
        if version == 0:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[None]:
    """One transaction; IMMEDIATE takes the write lock up front so it never fails half way on a busy lock."""
    conn.execute(f"BEGIN {mode}")
    try:
        yield
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def wrap_error(exc: sqlite3.Error, path: Path) -> EmbeddedLogError:
    # Busy, locked, disk full, I/O error: OperationalError, worth retrying. Corruption or a bug: not.
    retriable = isinstance(exc, sqlite3.OperationalError)
    name = getattr(exc, "sqlite_errorname", type(exc).__name__)
    return EmbeddedLogError(f"embedded log {path}: {name}: {exc}", retriable=retriable)
