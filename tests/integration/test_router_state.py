"""The faust router's dedupe table on local disk (services.router.state), on the real broker: a restart
reads only the changelog's tail, a kill loses no state, a rebalance moves partitions with their state,
a damaged or deleted file is rebuilt from the changelog, and entries past the window are deleted."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import faust
import pytest

from schemas import codec
from schemas.events import MailFetched, RecipientsResolved
from schemas.topics import FETCHED, ROUTED, topic_spec
from services.router.app import SEEN_TABLE
from services.router.state import SeenCopiesStore, SeenCopiesTable, expire_partition
from services.runtime.stages import router_internal_topics
from tests.integration.test_router_dedupe import copy, fetched, run_router_process, start_router_process
from tests.integration.test_router_rebalance import Pipeline

pytestmark = pytest.mark.integration

PARTITIONS = topic_spec(FETCHED).partitions


def copies(batch: str, count: int) -> list[MailFetched]:
    """One ISP copy (no Delivered-To: the To: line routes it to alice and bob) of `count` messages."""
    return [fetched(f"{batch}-{n}", copy(f"m{n}@outside.example", delivered_to=None)) for n in range(count)]


async def routed(pipeline: Pipeline, events: Iterable[MailFetched]) -> dict[str, RecipientsResolved]:
    """The latest routed event of each of `events`, by uidl."""
    wanted = {e.fetch_id: e.uidl for e in events}
    found: dict[str, RecipientsResolved] = {}
    async for record in pipeline.log.scan(pipeline.settings.topic(ROUTED)):
        event = codec.decode(record.value, RecipientsResolved)
        if event.fetch_id in wanted:
            found[wanted[event.fetch_id]] = event
    return found


def suppressed_copies(found: dict[str, RecipientsResolved]) -> list[str]:
    """The uidls whose recipients were all suppressed as already routed by another copy."""
    return sorted(u for u, e in found.items() if not e.recipients and len(e.suppressed) == 2)


def changelog(pipeline: Pipeline) -> str:
    return router_internal_topics(pipeline.settings)[1].name


def seen_table(app: faust.App) -> SeenCopiesTable:
    table = app.tables[SEEN_TABLE]
    assert isinstance(table, SeenCopiesTable)
    return table


async def recovered(app: faust.App) -> None:
    """Wait until the app restored its table for its first assignment (faust's Recovery says so)."""
    tables: Any = app.tables  # TableManagerT does not declare `recovery`
    await asyncio.wait_for(tables.recovery.completed.wait(), 60)


async def route(pipeline: Pipeline, app: faust.App, events: list[MailFetched]) -> None:
    await app.start()
    try:
        await recovered(app)
        await pipeline.send_fetched(events)
        await pipeline.idle()
    finally:
        await app.stop()


@pytest.fixture
async def pipeline(kafka_bootstrap: str, kafka_topic_prefix: str, tmp_path: Path) -> Pipeline:
    created = Pipeline(kafka_bootstrap, kafka_topic_prefix, tmp_path / "popbridge.toml")
    await created.create_topics()
    # faust's assignor skips a topic its first metadata does not show yet (services.router.worker checks
    # the same before it starts an app): wait until the broker shows every internal topic.
    for spec in router_internal_topics(created.settings):
        async with asyncio.timeout(30):
            while not await created.log.partitions(spec.name):  # noqa: ASYNC110 - no event tells
                await asyncio.sleep(0.1)
    return created


class RestoreCount:
    """How many changelog records the stores applied while restoring (faust's Recovery calls
    `apply_changelog_batch` with what it read)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.records = 0
        original = SeenCopiesStore.apply_changelog_batch

        def counting(store: SeenCopiesStore, batch: Iterable[Any], *args: Any, **kwargs: Any) -> None:
            events = list(batch)
            self.records += len(events)
            original(store, events, *args, **kwargs)

        monkeypatch.setattr(SeenCopiesStore, "apply_changelog_batch", counting)


async def test_a_restart_reads_only_the_changelog_written_after_its_checkpoint(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    await route(pipeline, pipeline.app(state), copies("a", 30))
    restores = RestoreCount(monkeypatch)

    await route(pipeline, pipeline.app(state), copies("b", 30))
    tail = restores.records
    await route(pipeline, pipeline.app(tmp_path / "new-node"), [])

    # faust reads each partition from its checkpoint, the record there included (one per partition).
    assert tail <= PARTITIONS
    assert restores.records - tail >= 30  # a replica without local state read the whole changelog
    found = await routed(pipeline, copies("b", 30))
    assert len(found) == 30
    assert suppressed_copies(found) == sorted(found)


async def test_a_router_killed_mid_run_keeps_its_table_and_a_later_copy_is_suppressed(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    monkeypatch.setenv("POPBRIDGE_DATA_DIR", str(data_dir))
    config = tmp_path / "popbridge.toml"
    process = await start_router_process(config, pipeline.settings)
    try:
        await pipeline.send_fetched(copies("a", 12))
        await pipeline.idle()
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    files = sorted((data_dir / "router").glob("*.sqlite3"))
    assert files, "the router kept no state on disk"

    await pipeline.send_fetched(copies("b", 12))
    assert await run_router_process(config, pipeline.settings) == 0

    found = await routed(pipeline, copies("b", 12))
    assert len(found) == 12
    assert suppressed_copies(found) == sorted(found)


@pytest.mark.slow
async def test_a_rebalance_moves_partitions_with_their_state(pipeline: Pipeline, tmp_path: Path) -> None:
    first = pipeline.app(tmp_path / "node-1")
    await first.start()
    apps = [first]
    try:
        await pipeline.send_fetched(copies("a", 24))
        await pipeline.idle()
        second = pipeline.app(tmp_path / "node-2")
        await second.start()
        apps.append(second)
        await recovered(second)
        await pipeline.send_fetched(copies("b", 24))
        await pipeline.idle()
        moved = {p: seen_table(second).store.count(p) for p in range(PARTITIONS)}
        actives = second.assignor.assigned_actives()
        held = sorted(tp.partition for tp in actives if tp.topic == changelog(pipeline))
    finally:
        for app in apps:
            await app.stop()

    assert held, "the second router got no partition"
    assert all(moved[p] > 0 for p in held)  # restored from the changelog on assignment
    found = await routed(pipeline, copies("b", 24))
    assert len(found) == 24
    assert suppressed_copies(found) == sorted(found)


@pytest.mark.slow
async def test_a_damaged_or_deleted_partition_file_is_rebuilt_from_the_changelog_with_a_warning(
    pipeline: Pipeline, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    await route(pipeline, pipeline.app(state), copies("a", 24))
    files = sorted(state.glob("*.sqlite3"))
    assert len(files) >= 2
    files[0].write_bytes(b"this is not a database" * 100)
    for extra in (*state.glob(f"{files[0].name}-*"), files[1], *state.glob(f"{files[1].name}-*")):
        extra.unlink()

    with caplog.at_level(logging.WARNING, logger="popbridge.router"):
        await route(pipeline, pipeline.app(state), copies("b", 24))

    assert any("unreadable" in r.getMessage() and files[0].name in r.getMessage() for r in caplog.records)
    found = await routed(pipeline, copies("b", 24))
    assert len(found) == 24
    assert suppressed_copies(found) == sorted(found)


async def test_entries_past_the_window_are_deleted_from_the_store_and_the_changelog(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    app = pipeline.app(tmp_path / "state", clock=lambda: now)
    await app.start()
    try:
        await pipeline.send_fetched(copies("a", 12))
        await pipeline.idle()
        table = seen_table(app)
        held = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == changelog(pipeline)}
        before = sum(table.store.count(p) for p in held)
        not_yet = sum(expire_partition(table, p, now + timedelta(days=6)) for p in held)
        deleted = sum(expire_partition(table, p, now + timedelta(days=8)) for p in held)
        after = sum(table.store.count(p) for p in held)
        await app.producer.flush()
    finally:
        await app.stop()

    assert (before, not_yet, deleted, after) == (12, 0, 12, 0)
    latest: dict[bytes | None, bytes] = {}
    async for record in pipeline.log.scan(changelog(pipeline)):
        latest[record.key] = record.value
    assert len(latest) == 12
    assert set(latest.values()) == {b""}  # a tombstone is each key's last word
