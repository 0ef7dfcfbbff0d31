"""Where the plain router loop (services.router.loop) keeps its dedupe table, per log.

- On the embedded log: an indexed table in the log's own file (services.runtime.embedded.state), read
  per Message-ID for each batch and pruned through its index: memory does not grow with history, and
  a start reads nothing ahead (except once, after an upgrade: the topic earlier releases kept the
  table in is imported into the empty table, a chunk at a time).
- On Kafka (`popbridge run` with a broker): the compacted `seen-copies` topic, read whole into memory
  at start, each change written with the batch's routed events. Kept as it was: the Kubernetes
  deployment runs the faust router, whose table lives on disk per partition (services.router.state).

Both apply a batch's changes before its routed events are sent and its offsets committed. A change
stored for a batch that is then not sent is harmless: the batch is read again and each copy is routed
again under its own fetch id, which dedupe never suppresses.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

import msgspec

from schemas.topics import ROUTER_SEEN_COPIES
from services.router.dedupe import SeenBodies, decode_seen, encode_seen, oldest_seen, prune
from services.runtime.embedded import EmbeddedLog
from services.runtime.embedded.state import EmbeddedState
from services.runtime.log import Log, Outgoing, Record
from services.runtime.settings import DeploymentSettings

log = logging.getLogger("popbridge.router")

EMBEDDED_TABLE = "router_seen_copies"  # the table's name in the embedded log's file
EXPIRE_BATCH = 1000  # entries pruned per pass
IMPORT_CHUNK = 500  # entries per transaction when importing the topic of earlier releases
SeenTable = dict[bytes, SeenBodies]


class SeenStore(Protocol):
    """The dedupe table of one router loop. `lookup` and `store` may raise LogError (the batch is then
    not committed); `expire` prunes what is past the window and returns how many entries it deleted."""

    async def lookup(self, keys: Sequence[bytes]) -> dict[bytes, SeenBodies]: ...

    async def store(self, changes: dict[bytes, SeenBodies]) -> list[Outgoing]:
        """Keep `changes`; returns records to send with the batch (the topic's), if any."""
        ...

    async def expire(self, now: datetime) -> int: ...


def prune_at_ms(seen: SeenBodies, window: timedelta) -> int:
    oldest = oldest_seen(seen)
    return 0 if oldest is None else int((oldest + window).timestamp() * 1000)


class EmbeddedSeenStore:
    """The table in the embedded log's file; open it with `async with`.

    `earlier` (the compacted topic where releases before this one kept the table) is imported, a chunk
    at a time, when the table is empty: an upgrade keeps its dedupe history."""

    def __init__(
        self, data_dir: Path, window: timedelta, *, earlier: AsyncIterator[Record] | None = None,
        now: datetime | None = None,
    ) -> None:
        self._state = EmbeddedState(data_dir, EMBEDDED_TABLE)
        self._window = window
        self._earlier = earlier
        self._now = now

    async def __aenter__(self) -> EmbeddedSeenStore:
        await self._state.__aenter__()
        if self._earlier is not None and self._now is not None and await self._state.count() == 0:
            await self._import(self._earlier, self._now)
        return self

    async def _import(self, records: AsyncIterator[Record], now: datetime) -> None:
        imported = 0
        chunk: dict[bytes, SeenBodies] = {}
        async for record in records:
            seen = prune(_decoded(record.key, record.value) or {}, now, self._window) if record.key else {}
            if seen and record.key is not None:
                chunk[record.key] = seen
            if len(chunk) >= IMPORT_CHUNK:
                imported += len(chunk)
                await self.store(chunk)
                chunk = {}
        imported += len(chunk)
        await self.store(chunk)
        if imported:
            log.info("router: %d dedupe entries imported from the seen-copies topic", imported)

    async def __aexit__(self, *exc: object) -> None:
        await self._state.__aexit__(None, None, None)

    async def lookup(self, keys: Sequence[bytes]) -> dict[bytes, SeenBodies]:
        found = await self._state.get_many(keys)
        return {key: seen for key, value in found.items() if (seen := _decoded(key, value)) is not None}

    async def store(self, changes: dict[bytes, SeenBodies]) -> list[Outgoing]:
        await self._state.write(
            [(key, encode_seen(seen), prune_at_ms(seen, self._window)) for key, seen in changes.items()]
        )
        return []

    async def expire(self, now: datetime) -> int:
        due = await self._state.due(int(now.timestamp() * 1000), EXPIRE_BATCH)
        fresh = {key: prune(_decoded(key, value) or {}, now, self._window) for key, value in due}
        changes = [
            (key, encode_seen(seen) if seen else None, prune_at_ms(seen, self._window))
            for key, seen in fresh.items()
        ]
        await self._state.write(changes)
        return sum(1 for seen in fresh.values() if not seen)

    async def count(self) -> int:
        return await self._state.count()


class TopicSeenStore:
    """The compacted topic, loaded whole at start (the Kafka log's `popbridge run`)."""

    def __init__(self, table: SeenTable, topic: str, window: timedelta) -> None:
        self.table = table
        self._topic = topic
        self._window = window

    async def __aenter__(self) -> TopicSeenStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def lookup(self, keys: Sequence[bytes]) -> dict[bytes, SeenBodies]:
        return {key: self.table[key] for key in keys if key in self.table}

    async def store(self, changes: dict[bytes, SeenBodies]) -> list[Outgoing]:
        self.table.update(changes)
        return [Outgoing(self._topic, encode_seen(seen), key) for key, seen in changes.items()]

    async def expire(self, now: datetime) -> int:
        expired = [key for key, seen in self.table.items() if not prune(seen, now, self._window)]
        for key in expired:
            del self.table[key]
        return len(expired)


async def open_seen_store(
    log_: Log, settings: DeploymentSettings, now: datetime, window: timedelta
) -> EmbeddedSeenStore | TopicSeenStore:
    """The store for `log_` (not yet entered)."""
    topic = settings.topic(ROUTER_SEEN_COPIES)
    if isinstance(log_, EmbeddedLog):
        earlier = log_.scan(topic) if await log_.partitions(topic) else None
        return EmbeddedSeenStore(log_.data_dir, window, earlier=earlier, now=now)
    table = load_table([(r.key, r.value) async for r in log_.scan(topic)], now, window)
    log.info("router: dedupe table loaded, %d Message-IDs", len(table))
    return TopicSeenStore(table, topic, window)


def load_table(values: Iterable[tuple[bytes | None, bytes]], now: datetime, window: timedelta) -> SeenTable:
    """The dedupe table from the compacted topic's records in log order (the latest per key wins);
    entries older than `window` are dropped, unreadable ones skipped."""
    table: SeenTable = {}
    for key, value in values:
        if key is None:
            continue
        fresh = prune(_decoded(key, value) or {}, now, window)
        if fresh:
            table[key] = fresh
        else:
            table.pop(key, None)
    return table


def _decoded(key: bytes | None, value: bytes) -> SeenBodies | None:
    try:
        return decode_seen(value)
    except msgspec.DecodeError as exc:
        problem = str(exc)
    log.error("dedupe entry for %r unreadable, dropped: %s", key, problem)
    return None
