"""services/fetcher/fetch_state.py and memory.py: the fetch state is read per mailbox from a store on disk,
and a restart reads only the changelog's tail (on the embedded log, the store's tables in its file)."""

from __future__ import annotations

import logging
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas import codec
from schemas.events import FetchRecorded, fetch_state_key
from schemas.topics import FETCH_STATE, TopicSpec, topic_spec
from services.fetcher.fetch_state import open_memory, store_path
from services.fetcher.memory import chunks, tail_ranges
from services.runtime.embedded import EmbeddedLog
from services.runtime.log import Outgoing, Written

T = datetime(2026, 12, 1, tzinfo=UTC)


def record(mailbox_id: str, uidl: str, size: int = 10) -> FetchRecorded:
    return FetchRecorded(
        mailbox_id=mailbox_id, uidl=uidl, fetch_id=f"f-{mailbox_id}-{uidl}-{size}", size=size,
        sha256="0" * 64, published_at=T,
    )  # fmt: skip


async def state_log(path: Path) -> EmbeddedLog:
    log = EmbeddedLog(path, synchronous="NORMAL")
    await log.ensure_topics([topic_spec(FETCH_STATE)])
    return log


async def write(log: EmbeddedLog, records: list[FetchRecorded]) -> list[Written]:
    async with log.producer() as producer:
        return await producer.send_all(
            [Outgoing(FETCH_STATE, codec.encode(r), fetch_state_key(r.mailbox_id, r.uidl)) for r in records]
        )


def test_the_tail_is_what_lies_between_the_checkpoint_and_the_end() -> None:
    assert tail_ranges({}, {0: 3, 1: 0}) == {0: (0, 3)}
    assert tail_ranges({0: 3, 1: 5}, {0: 3, 1: 9, 2: 1}) == {1: (5, 9), 2: (0, 1)}
    assert tail_ranges({0: 7}, {0: 3}) is None  # the topic was recreated: read it all again
    assert tail_ranges({5: 1}, {0: 3}) is None  # with fewer partitions


def test_a_long_tail_is_read_in_bounded_chunks() -> None:
    assert chunks(5, 5) == []
    assert chunks(0, 45_000) == [(0, 20_000), (20_000, 40_000), (40_000, 45_000)]


async def test_a_mailbox_is_read_on_its_own_and_a_restart_reads_only_what_was_written_since(
    tmp_path: Path,
) -> None:
    log = await state_log(tmp_path)
    await write(log, [record(f"box{n}", f"u{k}") for n in range(5) for k in range(20)])
    path = store_path(log, "")
    assert path == log.path  # embedded: the tables live in the log's own file
    async with open_memory(log, FETCH_STATE, path) as memory:
        assert set(await memory.known("box3")) == {f"u{k}" for k in range(20)}
        assert await memory.known("nobody") == {}
    await write(log, [record("box1", "new")])
    async with open_memory(log, FETCH_STATE, path) as memory:  # a restart
        assert await memory.catch_up() == 0  # opening read the tail already
        assert "new" in await memory.known("box1")
    with sqlite3.connect(path) as conn:  # the table is indexed by mailbox: a range read of the key
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT uidl, value FROM fetch_state WHERE topic = ? AND mailbox_id = ?",
            ("t", "m"),
        ).fetchall()
    assert "PRIMARY KEY" in str(plan)


async def test_a_restart_reads_the_tail_only(tmp_path: Path) -> None:
    log = await state_log(tmp_path / "log")
    await write(log, [record("box", f"u{k}") for k in range(300)])
    store = tmp_path / "kafka-mode" / "fetch-state.sqlite3"
    async with open_memory(log, FETCH_STATE, store):
        pass
    await write(log, [record("box", "late1"), record("other", "late2")])
    async with open_memory(log, FETCH_STATE, store) as memory:
        read_at_start = memory.last_catch_up
        assert len(await memory.known("box")) == 301
    assert read_at_start == 2


async def test_what_this_replica_wrote_is_not_undone_by_an_older_record_read_later(tmp_path: Path) -> None:
    log = await state_log(tmp_path)
    async with open_memory(log, FETCH_STATE, None) as memory:
        await write(log, [record("box", "u1", size=10)])  # not read yet: the checkpoint is behind it
        newer = record("box", "u1", size=99)  # the ISP reused u1; this replica recorded it
        [written] = await write(log, [newer])
        await memory.remember([(newer, written)])
        assert await memory.catch_up() == 2
        assert (await memory.known("box"))["u1"].size == 99


async def test_a_recreated_topic_is_read_again_from_its_start(tmp_path: Path) -> None:
    log = await state_log(tmp_path / "log")
    store = tmp_path / "fetch-state.sqlite3"
    await write(log, [record("box", f"u{k}") for k in range(5)])
    async with open_memory(log, FETCH_STATE, store):
        pass
    fresh = EmbeddedLog(tmp_path / "log2", synchronous="NORMAL")
    await fresh.ensure_topics([TopicSpec(FETCH_STATE, 1, topic_spec(FETCH_STATE).config)])
    await write(fresh, [record("box", "only")])
    async with open_memory(fresh, FETCH_STATE, store) as memory:
        assert set(await memory.known("box")) == {"only"}


async def test_a_corrupt_store_file_is_deleted_with_a_warning_and_read_again_from_the_topic(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = await state_log(tmp_path / "log")
    await write(log, [record("box", f"u{k}") for k in range(5)])
    store = tmp_path / "kafka-mode" / "fetch-state.sqlite3"
    async with open_memory(log, FETCH_STATE, store):
        pass
    store.write_bytes(b"this is not a database" * 100)  # a torn or overwritten file
    with caplog.at_level(logging.WARNING, logger="popbridge.fetcher"):
        async with open_memory(log, FETCH_STATE, store) as memory:
            assert memory.last_catch_up == 5  # the whole topic, once
            assert set(await memory.known("box")) == {f"u{k}" for k in range(5)}
    assert any("unreadable" in r.getMessage() and str(store) in r.getMessage() for r in caplog.records)
    assert store.stat().st_mode & 0o777 == 0o600
