"""services/deliverer/store.py: the deliverer's ledger store, on real SQLite files."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from services.deliverer.store import StateStoreError, ensure_ledger_tables, open_store

TOPIC = "popbridge.delivery.delivered"


def test_pairs_and_checkpoint_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    store = open_store(path, TOPIC)
    store.apply(3, [("f1", "a@x", 1000), ("f2", "b@x", 1000)], next_offset=2)
    store.close()  # as after a kill: nothing is kept in memory
    reopened = open_store(path, TOPIC)
    assert reopened.delivered("f1", "a@x")
    assert reopened.delivered("f2", "b@x")
    assert not reopened.delivered("f1", "b@x")
    assert reopened.checkpoint(3) == 2
    assert reopened.checkpoint(4) == 0


def test_own_writes_move_the_checkpoint_only_where_they_continue_it(tmp_path: Path) -> None:
    store = open_store(tmp_path / "ledger.sqlite3", TOPIC)
    store.apply(0, [], next_offset=5)
    store.record(0, [("f1", "a@x", 1)], [5])
    assert store.checkpoint(0) == 6
    store.record(0, [("f2", "a@x", 1)], [8])  # 6 and 7 were written by someone else: a restore reads them
    assert store.checkpoint(0) == 6
    assert store.delivered("f2", "a@x")


def test_pairs_past_the_retention_are_expired(tmp_path: Path) -> None:
    store = open_store(tmp_path / "ledger.sqlite3", TOPIC)
    store.apply(0, [("old", "a@x", 1_000), ("new", "a@x", 9_000)], next_offset=2)
    assert store.expire(before_ms=5_000) == 1
    assert not store.delivered("old", "a@x")
    assert store.delivered("new", "a@x")


def test_a_corrupt_store_is_deleted_and_rebuilt_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ledger.sqlite3"
    store = open_store(path, TOPIC)
    store.apply(0, [("f1", "a@x", 1)], next_offset=1)
    store.close()
    path.write_bytes(b"this is not a database" * 100)  # a torn or overwritten file
    with caplog.at_level(logging.WARNING):
        rebuilt = open_store(path, TOPIC)
    assert "unreadable" in caplog.text
    assert "rebuilding it from the changelog" in caplog.text
    assert rebuilt.checkpoint(0) == 0  # so the next restore reads the whole changelog partition
    assert not rebuilt.delivered("f1", "a@x")


def test_a_deleted_store_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.sqlite3"
    open_store(path, TOPIC).apply(0, [("f1", "a@x", 1)], next_offset=1)
    for leftover in path.parent.iterdir():
        leftover.unlink()
    assert open_store(path, TOPIC).checkpoint(0) == 0


def test_a_full_disk_is_one_clear_error_and_keeps_nothing_of_the_write(tmp_path: Path) -> None:
    # SQLite's max_page_count makes the file unable to grow: the same SQLITE_FULL a full volume gives.
    path = tmp_path / "ledger.sqlite3"
    store = open_store(path, TOPIC)
    store.apply(0, [], next_offset=0)
    conn = store._conn  # the store's own connection, capped where it stands
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    pairs = [(f"fetch-{i:06d}", f"recipient-{i}@example.com", 1) for i in range(5000)]
    with pytest.raises(StateStoreError, match="disk full") as raised:
        store.record(0, pairs, [0])
    assert str(raised.value).count("\n") == 0
    assert str(path) in str(raised.value)
    assert not raised.value.retriable
    assert store.checkpoint(0) == 0
    assert not store.delivered("fetch-000000", "recipient-0@example.com")


def test_the_ledger_tables_leave_a_foreign_database_alone(tmp_path: Path) -> None:
    # In embedded mode the tables live in the log's file: they are added beside its tables, and its
    # schema version is not touched.
    path = tmp_path / "log.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE records (id INTEGER PRIMARY KEY)")
    conn.execute("PRAGMA user_version = 1")
    ensure_ledger_tables(conn)
    conn.commit()
    store = open_store(path, TOPIC, dedicated=False)
    store.apply(1, [("f1", "a@x", 1)], next_offset=1)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} == {
        "records", "deliverer_ledger", "deliverer_ledger_checkpoints", "deliverer_ledger_staged"
    }


def test_a_restore_stages_pairs_and_merges_them_in_one_pass(tmp_path: Path) -> None:
    store = open_store(tmp_path / "ledger.sqlite3", TOPIC)
    store.record(0, [("f2", "a@x", 1)], [0])
    store.stage(0, [("f3", "a@x", 1), ("f2", "a@x", 1)], next_offset=2)  # f2: already there, kept once
    store.stage(1, [("f1", "b@x", 1), ("01", "c@x", 1)], next_offset=7)
    assert not store.delivered("f1", "b@x")  # staged, not yet the store's answer
    assert store.merge_staged() == 4
    assert all(store.delivered(f, r) for f, r in [("f1", "b@x"), ("01", "c@x"), ("f2", "a@x"), ("f3", "a@x")])
    assert (store.count(), store.checkpoint(0), store.checkpoint(1)) == (4, 2, 7)
    assert store.merge_staged() == 0


def test_pairs_staged_by_a_restore_cut_short_are_merged_when_the_store_is_opened(tmp_path: Path) -> None:
    # The checkpoint moved with the staged pairs: a restart must not read them again, nor miss them.
    path = tmp_path / "ledger.sqlite3"
    store = open_store(path, TOPIC)
    store.stage(2, [("f1", "a@x", 1), ("f2", "a@x", 1)], next_offset=2)
    store.close()  # killed before the restore's end merged them
    reopened = open_store(path, TOPIC)
    assert reopened.checkpoint(2) == 2
    assert reopened.delivered("f1", "a@x")
    assert reopened.delivered("f2", "a@x")
    reopened.stage(2, [("f3", "a@x", 1)], next_offset=3)  # numbered past what was staged before
    assert reopened.merge_staged() == 1


def test_a_store_from_before_staging_is_opened_with_its_pairs_and_without_the_time_index(
    tmp_path: Path,
) -> None:
    # The previous layout: the same table and checkpoints, plus an index by time that a restore in key order
    # would write at random; it is dropped in place, nothing is rebuilt.
    path = tmp_path / "ledger.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE deliverer_ledger (fetch_id TEXT NOT NULL, recipient TEXT NOT NULL, part"
                 " INTEGER NOT NULL, delivered_ms INTEGER NOT NULL, PRIMARY KEY (fetch_id, recipient))"
                 " WITHOUT ROWID")
    conn.execute("CREATE INDEX deliverer_ledger_by_time ON deliverer_ledger (delivered_ms)")
    conn.execute("INSERT INTO deliverer_ledger VALUES ('f1', 'a@x', 0, 1000)")
    conn.commit()
    conn.close()
    store = open_store(path, TOPIC)
    assert store.delivered("f1", "a@x")
    assert store.expire(before_ms=2_000) == 1
    indexes = store._conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
    assert [name for (name,) in indexes] == []
