"""The fetcher's durable memory: which UIDL of which mailbox was published, per mailbox, read from the
fetch-state store on disk (services.fetcher.fetch_state) and kept current from the changelog's tail.

Memory is bounded whatever the history: the store's page cache, plus the rows of the mailboxes in a pass
(at most `max_parallel_mailboxes` of them; the service drops them when the pass ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

from schemas import codec
from schemas.events import FetchRecorded
from services.fetcher.fetch_state import FetchStateStore, Row
from services.runtime.log import Record, Written

T = TypeVar("T")
_log = logging.getLogger("popbridge.fetcher")

READ_CHUNK = 20_000  # records per changelog read: bounds what a catch-up holds at once (a few MB)


class ChangelogReader(Protocol):
    """What a catch-up needs of the log (KafkaLog and EmbeddedLog have it)."""

    async def end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset the next record written will get."""
        ...

    async def read(self, topic: str, partition: int, start: int, end: int) -> list[Record]:
        """The records of one partition with `start <= offset < end` (compaction leaves gaps)."""
        ...


def tail_ranges(checkpoint: Mapping[int, int], ends: Mapping[int, int]) -> dict[int, tuple[int, int]] | None:
    """Per partition, the [start, end) of the changelog not read yet; None when a checkpoint is past its
    partition's end or names a partition the topic lacks (the topic was recreated): the mirror must be
    dropped and read again from 0. (A topic recreated with as many partitions and already written past
    the checkpoints cannot be told apart: delete the store file when recreating the topic.)"""
    if set(checkpoint) - set(ends) or any(checkpoint.get(p, 0) > end for p, end in ends.items()):
        return None
    return {p: (checkpoint.get(p, 0), end) for p, end in ends.items() if checkpoint.get(p, 0) < end}


def chunks(start: int, end: int, size: int = READ_CHUNK) -> list[tuple[int, int]]:
    return [(s, min(s + size, end)) for s in range(start, end, size)]


class FetchMemory:
    """Per mailbox, UIDL -> the latest FetchRecorded, on disk. `catch_up` reads the changelog's tail;
    `remember` stores what this fetcher just wrote (durable in the log already)."""

    def __init__(self, store: FetchStateStore, log_: ChangelogReader, topic: str) -> None:
        self._store = store
        self._log = log_
        self._topic = topic
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="fetch-state")  # the store's one thread
        self._catching_up = asyncio.Lock()
        self.last_catch_up = 0  # records the last catch-up read (at a restart: the tail)

    async def _run(self, fn: partial[T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def known(
        self, mailbox_id: str, uidls: Iterable[str] | None = None, *, content_keys: bool = False
    ) -> dict[str, FetchRecorded]:
        """What `mailbox_id` published: every UIDL, or only `uidls` (see FetchStateStore.known)."""
        wanted = None if uidls is None else list(uidls)
        return await self._run(
            partial(self._store.known, self._topic, mailbox_id, wanted, content_keys=content_keys)
        )

    async def remember(self, written: Sequence[tuple[FetchRecorded, Written]]) -> None:
        rows = [(w.partition, w.offset, codec.encode(r)) for r, w in written]
        await self._run(partial(self._store.apply, self._topic, rows))

    async def catch_up(self) -> int:
        """Read the changelog from the checkpoint to its end now; returns how many records were read."""
        async with self._catching_up:
            ends = await self._log.end_offsets(self._topic)
            checkpoint: dict[int, int] = await self._run(partial(self._store.checkpoint, self._topic))
            ranges = tail_ranges(checkpoint, ends)
            if ranges is None:
                await self._run(partial(self._store.forget, self._topic))
                ranges = tail_ranges({}, ends) or {}
            count = 0
            for part, (start, end) in sorted(ranges.items()):
                for low, high in chunks(start, end):
                    records = await self._log.read(self._topic, part, low, high)
                    rows: list[Row] = [(r.partition, r.offset, r.value) for r in records]
                    count += await self._run(partial(self._store.apply, self._topic, rows, {part: high}))
            self.last_catch_up = count
            return count

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self._store.close()


def store_path(log_: object, data_dir: str) -> Path | None:
    """Where the store lives: in the embedded log's own file; else `<data_dir>/fetch-state.sqlite3`;
    else None (a temporary file, read again from the whole changelog at every start)."""
    embedded = getattr(log_, "path", None)
    if isinstance(embedded, Path):
        return embedded
    return Path(data_dir).expanduser() / "fetch-state.sqlite3" if data_dir else None


@contextlib.asynccontextmanager
async def open_memory(log_: ChangelogReader, topic: str, path: Path | None) -> AsyncIterator[FetchMemory]:
    """The fetcher's memory in `path` (a temporary directory when None), caught up with the changelog."""
    with contextlib.ExitStack() as stack:
        if path is None:
            path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="popbridge-fetch-state-")))
            path /= "fetch-state.sqlite3"
        memory = FetchMemory(FetchStateStore(path), log_, topic)
        try:
            read = await memory.catch_up()
            _log.info("fetch state: %d records read from the changelog since the checkpoint", read)
            yield memory
        finally:
            memory.close()
