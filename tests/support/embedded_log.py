"""Helpers for the embedded log's tests (tests/unit/runtime/embedded/): a log with one topic, a clock
the test moves, and reading a consumer until enough arrived."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from schemas.topics import TopicSpec
from services.runtime.embedded import EmbeddedLog
from services.runtime.log import LogConsumer, Outgoing, Record, next_offsets

TOPIC = "mail"


class FakeClock:
    """Seconds since the epoch, moved by the test."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def new_log(path: Path, partitions: int = 3, config: dict[str, str] | None = None) -> EmbeddedLog:
    log = EmbeddedLog(path)
    await log.ensure_topics([TopicSpec(TOPIC, partitions, config or {})])
    return log


async def produce(log: EmbeddedLog, records: Sequence[Outgoing]) -> None:
    async with log.producer() as producer:
        await producer.send_all(records)


def keyed(count: int, keys: int = 7, start: int = 0) -> list[Outgoing]:
    return [Outgoing(TOPIC, b"value-%d" % i, key=b"key-%d" % (i % keys)) for i in range(start, start + count)]


async def read(
    consumer: LogConsumer, count: int, *, commit: bool = True, deadline: float = 10.0
) -> list[Record]:
    """Fetch (and commit) until `count` records arrived."""
    records: list[Record] = []
    give_up = time.monotonic() + deadline
    while len(records) < count and time.monotonic() < give_up:
        batch = await consumer.fetch(0.5, max_records=count - len(records))
        records += batch
        if commit:
            await consumer.commit(next_offsets(batch))
    return records


def values(records: Sequence[Record]) -> list[bytes]:
    return [r.value for r in records]


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)
