"""services/runtime/sqlite_state.py: opening a state file, a corrupt one, errors, transactions and the
checkpoint table, on real SQLite files."""

from __future__ import annotations

import logging
import sqlite3
from functools import partial
from pathlib import Path

import pytest

from services.runtime import sqlite_state
from services.runtime.sqlite_state import StateStoreError

CHECKPOINTS = "test_checkpoints"


def _prepare(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS items (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    sqlite_state.create_checkpoint_table(conn, CHECKPOINTS)
    conn.execute(f"SELECT count(*) FROM {CHECKPOINTS}").fetchone()


def _open(path: Path) -> sqlite3.Connection:
    return sqlite_state.open_state_file(path, _prepare, synchronous="NORMAL", cache_kib=2048)


def _write(
    conn: sqlite3.Connection, items: list[tuple[str, str]], *, checkpoint: int = 0, bug: bool = False,
    errors: sqlite_state.ErrorMapper | None = None,
) -> None:
    """One transaction: `items`, the checkpoint of topic "t" partition 0, then (with `bug`) a KeyError."""
    with sqlite_state.transaction(conn, errors):
        sqlite_state.set_checkpoint(conn, CHECKPOINTS, "t", 0, checkpoint)
        conn.executemany("INSERT INTO items VALUES (?, ?)", items)
        if bug:
            raise KeyError("a bug half way")


def test_a_new_state_file_is_private_to_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "state" / "store.sqlite3"
    conn = _open(path)
    conn.execute("INSERT INTO items VALUES ('a', '1')")  # the -wal file appears with the first write
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.with_name(path.name + "-wal").stat().st_mode & 0o777 == 0o600


def test_the_store_chooses_its_durability_and_memory(tmp_path: Path) -> None:
    cached = _open(tmp_path / "a.sqlite3")
    assert cached.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert cached.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert cached.execute("PRAGMA cache_size").fetchone()[0] == -2048
    full = sqlite_state.open_state_file(
        tmp_path / "b.sqlite3", _prepare, synchronous="FULL", journal_size_limit=65536
    )
    assert full.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert full.execute("PRAGMA journal_size_limit").fetchone()[0] == 65536


def test_a_corrupt_file_is_deleted_with_one_warning_and_opened_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "store.sqlite3"
    conn = _open(path)
    conn.execute("INSERT INTO items VALUES ('a', '1')")
    conn.close()
    path.write_bytes(b"this is not a database" * 100)  # a torn or overwritten file
    stale_wal = path.with_name(path.name + "-wal")
    stale_wal.write_bytes(b"left over")
    with caplog.at_level(logging.WARNING):
        rebuilt = sqlite_state.open_or_rebuild(path, _open, "test state")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(path) in warnings[0]
    assert "rebuilding it from the changelog" in warnings[0]
    assert rebuilt.execute("SELECT count(*) FROM items").fetchone()[0] == 0
    assert sqlite_state.checkpoints(rebuilt, CHECKPOINTS, "t") == {}
    assert stale_wal.read_bytes() != b"left over"  # deleted with the file, not replayed into it


def test_a_file_that_cannot_be_opened_is_not_deleted(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    path.mkdir()  # SQLITE_CANTOPEN: not corruption, deleting would not help
    with pytest.raises(sqlite3.OperationalError):
        sqlite_state.open_or_rebuild(path, _open, "test state")
    assert path.is_dir()


def test_a_full_disk_is_one_line_naming_the_file_and_commits_nothing(tmp_path: Path) -> None:
    # SQLite's max_page_count makes the file unable to grow: the same SQLITE_FULL a full volume gives.
    path = tmp_path / "store.sqlite3"
    conn = _open(path)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    errors = partial(sqlite_state.state_error, path=path, what="test state")
    items = [(f"k{i:06d}", "v" * 200) for i in range(5000)]
    with pytest.raises(StateStoreError, match="disk full") as raised:
        _write(conn, items, checkpoint=7, errors=errors)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"test state {path}: ")
    assert not raised.value.retriable
    assert not conn.in_transaction
    assert sqlite_state.checkpoint(conn, CHECKPOINTS, "t", 0) == 0
    assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 0


def test_a_transaction_commits_or_rolls_back_as_a_whole(tmp_path: Path) -> None:
    conn = _open(tmp_path / "store.sqlite3")
    with pytest.raises(KeyError):
        _write(conn, [("lost", "1")], checkpoint=3, bug=True)
    _write(conn, [("kept", "1")], checkpoint=4)
    assert [row[0] for row in conn.execute("SELECT key FROM items")] == ["kept"]
    assert sqlite_state.checkpoint(conn, CHECKPOINTS, "t", 0) == 4
    with pytest.raises(sqlite3.IntegrityError):  # without `errors`, a SQLite error leaves as it is
        _write(conn, [("kept", "2")], checkpoint=5)
    assert sqlite_state.checkpoint(conn, CHECKPOINTS, "t", 0) == 4


def test_corruption_met_later_is_named_as_such() -> None:
    exc = sqlite3.DatabaseError("database disk image is malformed")
    exc.sqlite_errorname = "SQLITE_CORRUPT"
    message = str(sqlite_state.state_error(exc, Path("/state/x.sqlite3"), "test state"))
    assert message.startswith("test state /state/x.sqlite3: corrupt (SQLITE_CORRUPT)")
    assert "rebuilds it from the changelog" in message


def test_checkpoints_are_kept_per_topic_and_partition_and_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    conn = _open(path)
    with sqlite_state.transaction(conn):
        sqlite_state.set_checkpoint(conn, CHECKPOINTS, "a", 0, 5)
        sqlite_state.set_checkpoint(conn, CHECKPOINTS, "a", 1, 9)
        sqlite_state.set_checkpoint(conn, CHECKPOINTS, "b", 0, 3)
        sqlite_state.set_checkpoint(conn, CHECKPOINTS, "a", 0, 6)  # moves forward, one row per partition
    conn.close()
    reopened = _open(path)
    assert sqlite_state.checkpoints(reopened, CHECKPOINTS, "a") == {0: 6, 1: 9}
    assert sqlite_state.checkpoint(reopened, CHECKPOINTS, "b", 0) == 3
    assert sqlite_state.checkpoint(reopened, CHECKPOINTS, "b", 1) == 0


def test_a_checkpoint_table_name_must_be_an_identifier(tmp_path: Path) -> None:
    conn = _open(tmp_path / "store.sqlite3")
    with pytest.raises(ValueError, match="not a table name"):
        sqlite_state.create_checkpoint_table(conn, "x; DROP TABLE items")
