"""services/router/seen_store.py: the plain loop's dedupe table in the embedded log's file, read per key,
with entries past the window deleted (not only ignored)."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

from schemas.topics import ROUTER_SEEN_COPIES
from services.router.dedupe import SeenCopy, body_digest, encode_seen
from services.router.loop import RouterLoop
from services.router.seen_store import EMBEDDED_TABLE, EmbeddedSeenStore
from services.runtime.embedded import DB_NAME
from services.runtime.log import Outgoing
from tests.unit.router.test_loop import CONFIG, SETTINGS, T, copy_of, fetched, new_log, publish

WEEK = timedelta(days=7)


def seen(*ages: timedelta) -> dict[str, SeenCopy]:
    return {f"body{n}": SeenCopy(routed_by={"a@example.com": f"f{n}"}, first_seen=T - age)
            for n, age in enumerate(ages)}  # fmt: skip


async def test_entries_past_the_window_are_deleted_and_partly_expired_ones_pruned(tmp_path: Path) -> None:
    async with EmbeddedSeenStore(tmp_path, WEEK) as store:
        await store.store({
            b"old": seen(timedelta(days=8)),
            b"mixed": seen(timedelta(days=9), timedelta(days=1)),
            b"fresh": seen(timedelta(days=2)),
        })  # fmt: skip

        deleted = await store.expire(T)

        assert deleted == 1
        assert await store.count() == 2
        found = await store.lookup([b"old", b"mixed", b"fresh", b"unknown"])
    assert set(found) == {b"mixed", b"fresh"}
    assert list(found[b"mixed"]) == ["body1"]  # the 9-day-old body is gone from the stored entry


async def test_nothing_is_due_before_the_window_has_passed(tmp_path: Path) -> None:
    async with EmbeddedSeenStore(tmp_path, WEEK) as store:
        await store.store({b"k": seen(timedelta(days=6, hours=23))})
        assert await store.expire(T) == 0
        assert await store.count() == 1


async def test_the_loop_on_the_embedded_log_keeps_its_table_in_the_log_file_not_in_the_topic(
    tmp_path: Path,
) -> None:
    log = await new_log(tmp_path)
    await publish(log, fetched("f1", copy_of("alice")), fetched("f2", copy_of("bob")))

    counts = await RouterLoop(log, SETTINGS, CONFIG, clock=lambda: T, poll_seconds=0.05).run(until_idle=True)

    assert counts.routed == 2
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        (rows,) = conn.execute(f"SELECT count(*) FROM {EMBEDDED_TABLE}").fetchone()
        plan = conn.execute(f"EXPLAIN QUERY PLAN SELECT value FROM {EMBEDDED_TABLE} WHERE key = ?", (b"k",))
        details = " ".join(str(row[-1]) for row in plan)
    assert rows == 1  # one Message-ID
    assert "PRIMARY KEY" in details or "USING" in details  # a lookup by key, not a scan
    assert [r async for r in log.scan("t.popbridge.router.seen-copies")] == []


async def test_a_restart_after_the_window_routes_a_late_copy_again(tmp_path: Path) -> None:
    log = await new_log(tmp_path)
    await publish(log, fetched("f1", copy_of("alice")))
    await RouterLoop(log, SETTINGS, CONFIG, clock=lambda: T, poll_seconds=0.05).run(until_idle=True)
    await publish(log, fetched("f2", copy_of("alice")))  # the same message, eight days later

    later = T + timedelta(days=8)
    loop = RouterLoop(log, SETTINGS, CONFIG, clock=lambda: later, poll_seconds=0.05)
    counts = await loop.run(until_idle=True)

    assert (counts.routed, counts.suppressed) == (1, 0)


async def test_an_upgrade_imports_the_table_earlier_releases_kept_in_the_topic(tmp_path: Path) -> None:
    log = await new_log(tmp_path)
    digest = body_digest(copy_of("alice"))
    earlier = {digest: SeenCopy(routed_by={"alice@example.com": "f1"}, first_seen=T)}
    async with log.producer() as producer:  # what the loop of earlier releases wrote
        await producer.send(Outgoing("t." + ROUTER_SEEN_COPIES, encode_seen(earlier), b"m1@sender.example"))
    await publish(log, fetched("f2", copy_of("alice")))

    async with EmbeddedSeenStore(tmp_path, WEEK, earlier=log.scan("t." + ROUTER_SEEN_COPIES), now=T) as store:
        assert await store.count() == 1
    counts = await RouterLoop(log, SETTINGS, CONFIG, clock=lambda: T, poll_seconds=0.05).run(until_idle=True)

    assert (counts.routed, counts.suppressed) == (1, 1)  # f1 routed alice before the upgrade
