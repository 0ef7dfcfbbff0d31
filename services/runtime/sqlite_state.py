"""Local state stores in SQLite, the parts every store shares: opening a state file (private, WAL, the
store's pragmas), deleting a corrupt one to rebuild it from the changelog, one transaction, what a SQLite
error means, and the per-partition checkpoint table (the next changelog offset to apply).

The stores built on it keep their own tables and rules: the deliverer's ledger (services.deliverer.store),
the fetcher's fetch state (services.fetcher.fetch_state), the faust router's dedupe partitions
(services.router.state, tables from services.runtime.state_table). Each file is a cache of a changelog
topic (Kafka Streams' model): losing it costs a restore, never data, so a corrupt file is deleted and
started empty. A file shared with the embedded log is never deleted here: its corruption is the log's.

Errors:
    LogError (services.runtime.log)
    └── StateStoreError     not retriable: the disk is full (SQLITE_FULL), the file is corrupt, or
                            another SQLite failure; one line naming the file (`state_error`)
"""

# ruff: noqa: S608 - the only text put into SQL is a table name, which _checked proves is an identifier

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from services.runtime.embedded.files import create_private
from services.runtime.embedded.schema import transaction as _log_transaction
from services.runtime.log import LogError

logger = logging.getLogger(__name__)

BUSY_TIMEOUT = 30.0  # seconds a write waits for another connection (embedded: the log's own writers)
_CORRUPT = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})

Synchronous = Literal["FULL", "NORMAL"]
Prepare = Callable[[sqlite3.Connection], None]
ErrorMapper = Callable[[sqlite3.Error], Exception]


class StateStoreError(LogError):
    """A state store cannot do what was asked; the stage stops, committing nothing more."""

    retriable = False


def open_state_file(
    path: Path, prepare: Prepare, *, synchronous: Synchronous, cache_kib: int | None = None,
    journal_size_limit: int | None = None, check_same_thread: bool = True,
) -> sqlite3.Connection:
    """A connection to `path` (created 0600 in a 0700 directory when missing), in WAL mode with the
    store's pragmas; `prepare` then creates its tables and reads a page, so a damaged file fails here.
    Raises sqlite3.Error; the connection is closed when anything fails."""
    create_private(path)
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=check_same_thread
    )
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL" if synchronous == "FULL" else "PRAGMA synchronous = NORMAL")
        if cache_kib is not None:
            conn.execute(f"PRAGMA cache_size = -{int(cache_kib)}")  # negative: KiB, the memory bound
        if journal_size_limit is not None:  # the WAL shrinks back to this after a checkpoint
            conn.execute(f"PRAGMA journal_size_limit = {int(journal_size_limit)}")
        prepare(conn)
    except BaseException:
        conn.close()
        raise
    return conn


Opener = Callable[[Path], sqlite3.Connection]


def open_or_rebuild(
    path: Path, opener: Opener, what: str, *, log: logging.Logger = logger
) -> sqlite3.Connection:
    """`opener(path)`; when SQLite finds the file corrupt or not a database, it is deleted (with its -wal
    and -shm) with one warning on the store's `log` and opened empty: the caller restores it from the
    changelog. Any other failure (disk full, I/O, locked) is raised as it is: deleting would not help."""
    try:
        return opener(path)
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError) and not corrupt(exc):
            raise
        log.warning("%s %s is unreadable (%s): deleted, rebuilding it from the changelog", what, path, exc)
        for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            leftover.unlink(missing_ok=True)
        return opener(path)


def corrupt(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorname", "") in _CORRUPT


def state_error(exc: sqlite3.Error, path: Path, what: str) -> StateStoreError:
    """`exc` as one line naming the file and what the operator can do."""
    name = getattr(exc, "sqlite_errorname", type(exc).__name__)
    if corrupt(exc):
        return StateStoreError(f"{what} {path}: corrupt ({name}): stop the stage and delete it, the next"
                               " start rebuilds it from the changelog")
    if name == "SQLITE_FULL":
        return StateStoreError(f"{what} {path}: disk full ({name}): free space or give the state"
                               " directory a larger volume; nothing after this was committed")
    return StateStoreError(f"{what} {path}: {name}: {exc}".replace("\n", " "))


@contextlib.contextmanager
def transaction(
    conn: sqlite3.Connection, errors: ErrorMapper | None = None
) -> Iterator[None]:
    """The embedded log's transaction, the one of every SQLite file here: BEGIN IMMEDIATE (the write lock
    up front, so it never fails half way on a busy lock) .. COMMIT, rolled back on any error. With
    `errors`, a SQLite error leaves as `errors(exc)` (e.g. state_error)."""
    try:
        with _log_transaction(conn):
            yield
    except sqlite3.Error as exc:
        if errors is None:
            raise
        raise errors(exc) from exc


# --- the checkpoint table: (topic, partition) -> the next changelog offset to apply ----------------------


def create_checkpoint_table(conn: sqlite3.Connection, table: str) -> None:
    """The checkpoint table `table`, when missing (its own statement: no schema version is touched)."""
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {_checked(table)} (topic TEXT NOT NULL, part INTEGER NOT NULL,"
        " next_offset INTEGER NOT NULL, PRIMARY KEY (topic, part)) WITHOUT ROWID"
    )


def checkpoints(conn: sqlite3.Connection, table: str, topic: str) -> dict[int, int]:
    """Per partition of `topic`, the next changelog offset to apply (absent: nothing applied yet)."""
    rows = conn.execute(f"SELECT part, next_offset FROM {_checked(table)} WHERE topic = ?", (topic,))
    return {int(part): int(offset) for part, offset in rows}


def checkpoint(conn: sqlite3.Connection, table: str, topic: str, part: int) -> int:
    """The next changelog offset to apply for one partition (0: nothing applied yet)."""
    row = conn.execute(
        f"SELECT next_offset FROM {_checked(table)} WHERE topic = ? AND part = ?", (topic, part)
    ).fetchone()
    return 0 if row is None else int(row[0])


def set_checkpoint(conn: sqlite3.Connection, table: str, topic: str, part: int, next_offset: int) -> None:
    """Not a transaction of its own: it commits with the changes it covers."""
    conn.execute(
        f"INSERT INTO {_checked(table)} (topic, part, next_offset) VALUES (?, ?, ?)"
        " ON CONFLICT (topic, part) DO UPDATE SET next_offset = excluded.next_offset",
        (topic, part, next_offset),
    )


def _checked(table: str) -> str:
    if not table.isidentifier():
        raise ValueError(f"not a table name: {table!r}")
    return table
