"""A keyed state table in SQLite: key -> value, with when the value next needs pruning, indexed, and
the changelog offset applied so far per partition. Blocking calls on a connection the caller owns.

Stores built on it: the faust router's dedupe store (services.router.state, one file per changelog
partition) and the plain router loop's dedupe table inside the embedded log's file
(services.router.seen_store). A value is opaque here; `prune_at_ms` (the value's oldest timestamp plus
the retention window, chosen by the caller) is indexed, so expiry reads only what is due, and lookups
go by primary key: nothing is ever loaded whole, so memory stays at SQLite's page cache whatever the
history holds.
"""

# ruff: noqa: S608 - the only text put into SQL is a table name, which create_table checks is an identifier

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

KeyValue = tuple[bytes, bytes]
Change = tuple[bytes, bytes | None, int]  # key, value (None: delete), prune_at_ms


def create_table(conn: sqlite3.Connection, name: str) -> None:
    """The table `name` and its checkpoint table, when missing (their own statements, no schema version:
    the embedded log's schema stays as it is, and other tables can be added beside them)."""
    if not name.isidentifier():
        raise ValueError(f"not a table name: {name!r}")
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {name} (key BLOB PRIMARY KEY, prune_at_ms INTEGER NOT NULL,"
        " value BLOB NOT NULL) WITHOUT ROWID"
    )
    conn.execute(f"CREATE INDEX IF NOT EXISTS {name}_by_prune_at ON {name} (prune_at_ms)")
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {name}_applied (part INTEGER PRIMARY KEY, changelog_offset INTEGER"
        " NOT NULL)"
    )


def get(conn: sqlite3.Connection, name: str, key: bytes) -> bytes | None:
    row = conn.execute(f"SELECT value FROM {name} WHERE key = ?", (key,)).fetchone()
    return None if row is None else bytes(row[0])


def write(conn: sqlite3.Connection, name: str, changes: Iterable[Change]) -> None:
    """Apply `changes` (not in a transaction of its own: the caller decides what commits together)."""
    for key, value, prune_at_ms in changes:
        if value is None:
            conn.execute(f"DELETE FROM {name} WHERE key = ?", (key,))
        else:
            conn.execute(
                f"INSERT INTO {name} (key, prune_at_ms, value) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE"
                " SET prune_at_ms = excluded.prune_at_ms, value = excluded.value",
                (key, prune_at_ms, value),
            )


def due(conn: sqlite3.Connection, name: str, now_ms: int, limit: int) -> list[KeyValue]:
    """Up to `limit` entries whose pruning was due before `now_ms`, oldest first (read through the index)."""
    rows = conn.execute(
        f"SELECT key, value FROM {name} WHERE prune_at_ms < ? ORDER BY prune_at_ms LIMIT ?", (now_ms, limit)
    )
    return [(bytes(key), bytes(value)) for key, value in rows]


def count(conn: sqlite3.Connection, name: str) -> int:
    found: int = conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
    return found


def keys(conn: sqlite3.Connection, name: str, after: bytes, limit: int) -> list[KeyValue]:
    """Up to `limit` entries with a key above `after`, in key order (paged iteration)."""
    rows = conn.execute(f"SELECT key, value FROM {name} WHERE key > ? ORDER BY key LIMIT ?", (after, limit))
    return [(bytes(key), bytes(value)) for key, value in rows]


def applied_offset(conn: sqlite3.Connection, name: str, part: int) -> int | None:
    row = conn.execute(f"SELECT changelog_offset FROM {name}_applied WHERE part = ?", (part,)).fetchone()
    return None if row is None else int(row[0])


def set_applied_offset(conn: sqlite3.Connection, name: str, part: int, offset: int) -> None:
    conn.execute(
        f"INSERT INTO {name}_applied (part, changelog_offset) VALUES (?, ?) ON CONFLICT (part) DO UPDATE"
        " SET changelog_offset = excluded.changelog_offset",
        (part, offset),
    )


def clear(conn: sqlite3.Connection, name: str) -> None:
    conn.execute(f"DELETE FROM {name}")
    conn.execute(f"DELETE FROM {name}_applied")
