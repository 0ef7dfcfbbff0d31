"""A keyed state table inside the embedded log's file (services.runtime.state_table): a stage's state
next to the records it came from, queried per key and pruned through its index, never loaded whole.

The table is created on first use by its own statements (`state_table.create_table`), outside the
log's schema version: other state tables can be added beside it the same way.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from services.runtime import state_table
from services.runtime.embedded.files import DB_NAME
from services.runtime.embedded.schema import Synchronous, transaction
from services.runtime.embedded.worker import Worker


class EmbeddedState:
    """The state table `name` in `<data_dir>/log.sqlite3`, on its own connection and thread; an async
    context manager (the connection closes at exit)."""

    def __init__(self, data_dir: Path, name: str, *, synchronous: Synchronous = "FULL") -> None:
        self.name = name
        self._worker = Worker(Path(data_dir) / DB_NAME, synchronous)

    async def __aenter__(self) -> EmbeddedState:
        await self._worker.run(state_table.create_table, self.name)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._worker.close()

    async def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        """The stored values of those of `keys` that have one."""
        return await self._worker.run(_get_many, self.name, list(dict.fromkeys(keys)))

    async def write(self, changes: Sequence[state_table.Change]) -> None:
        """Apply `changes` in one transaction, durable when this returns."""
        if changes:
            await self._worker.run(_write, self.name, list(changes))

    async def due(self, now_ms: int, limit: int) -> list[state_table.KeyValue]:
        return await self._worker.run(state_table.due, self.name, now_ms, limit)

    async def count(self) -> int:
        return await self._worker.run(state_table.count, self.name)


def _get_many(conn: sqlite3.Connection, name: str, keys: list[bytes]) -> dict[bytes, bytes]:
    found = {key: state_table.get(conn, name, key) for key in keys}  # one primary-key lookup each
    return {key: value for key, value in found.items() if value is not None}


def _write(conn: sqlite3.Connection, name: str, changes: list[state_table.Change]) -> None:
    with transaction(conn):
        state_table.write(conn, name, changes)
