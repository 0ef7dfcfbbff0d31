"""services/runtime/state_table.py: the keyed state table's lookups, expiry order and offsets."""

from __future__ import annotations

import sqlite3

import pytest

from services.runtime import state_table


@pytest.fixture
def conn() -> sqlite3.Connection:
    connection = sqlite3.connect(":memory:", isolation_level=None)
    state_table.create_table(connection, "t")
    return connection


def test_written_values_are_read_back_replaced_and_deleted(conn: sqlite3.Connection) -> None:
    state_table.write(conn, "t", [(b"a", b"1", 10), (b"b", b"2", 20), (b"a", b"3", 30)])
    state_table.write(conn, "t", [(b"b", None, 0)])
    assert (state_table.get(conn, "t", b"a"), state_table.get(conn, "t", b"b")) == (b"3", None)
    assert state_table.count(conn, "t") == 1


def test_due_returns_only_entries_whose_time_has_passed_oldest_first_and_bounded(
    conn: sqlite3.Connection,
) -> None:
    state_table.write(conn, "t", [(b"late", b"x", 50), (b"early", b"y", 10), (b"mid", b"z", 30)])
    assert state_table.due(conn, "t", 40, 10) == [(b"early", b"y"), (b"mid", b"z")]
    assert state_table.due(conn, "t", 40, 1) == [(b"early", b"y")]
    assert state_table.due(conn, "t", 10, 10) == []


def test_the_applied_offset_is_kept_per_partition(conn: sqlite3.Connection) -> None:
    assert state_table.applied_offset(conn, "t", 0) is None
    state_table.set_applied_offset(conn, "t", 0, 41)
    state_table.set_applied_offset(conn, "t", 1, 7)
    state_table.set_applied_offset(conn, "t", 0, 42)
    assert (state_table.applied_offset(conn, "t", 0), state_table.applied_offset(conn, "t", 1)) == (42, 7)


def test_keys_pages_through_in_key_order(conn: sqlite3.Connection) -> None:
    state_table.write(conn, "t", [(bytes([n]), b"v", 0) for n in range(5)])
    first = state_table.keys(conn, "t", b"", 2)
    assert [k for k, _ in first] == [b"\x00", b"\x01"]
    assert [k for k, _ in state_table.keys(conn, "t", first[-1][0], 10)] == [b"\x02", b"\x03", b"\x04"]


def test_a_table_name_that_is_not_an_identifier_is_refused(conn: sqlite3.Connection) -> None:
    with pytest.raises(ValueError, match="not a table name"):
        state_table.create_table(conn, "t; DROP TABLE t")
