"""services/ops/reader.py: a key's records found without building the others (on the embedded log), and
concurrent lookups that fail leave none running."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from schemas.topics import TopicSpec
from services.ops.locate import KeyRead, Window
from services.ops.reader import keyed, offset_bounds
from services.runtime.embedded import EmbeddedLog
from services.runtime.log import LogError, Outgoing, Record


@dataclass
class CountingReader:
    """The embedded log's ranged reads, counting the records they hand over."""

    log: EmbeddedLog
    handed: int = 0
    reads: list[tuple[int, int]] = field(default_factory=list)

    async def start_offsets(self, topic: str) -> dict[int, int]:
        return await self.log.start_offsets(topic)

    async def end_offsets(self, topic: str) -> dict[int, int]:
        return await self.log.end_offsets(topic)

    async def offsets_for_time(self, topic: str, timestamp_ms: int) -> dict[int, int]:
        return await self.log.offsets_for_time(topic, timestamp_ms)

    async def read(
        self, topic: str, partition: int, start: int, end: int, *, key: bytes | None = None
    ) -> list[Record]:
        records = await self.log.read(topic, partition, start, end, key=key)
        self.handed += len(records)
        self.reads.append((start, end))
        return records


async def test_a_key_search_newest_first_is_handed_only_that_keys_records(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path, synchronous="NORMAL")
    await log.ensure_topics([TopicSpec("fetched", 1)])
    async with log.producer() as producer:
        await producer.send_all([Outgoing("fetched", b"v%d" % i, key=b"k%d" % (i % 50)) for i in range(3000)])
    reader = CountingReader(log)
    found = [r.offset async for r in keyed(reader, KeyRead("fetched", 0, b"k7", Window()), newest_first=True)]
    assert found == list(range(2957, 0, -50))
    assert reader.handed == len(found)  # the other 2,940 records were never built
    # reads holding only the key's records grow at once: 500, then 2,000, then the rest
    assert reader.reads == [(2500, 3000), (500, 2500), (0, 500)]


@dataclass
class RefusingReader:
    """A log that refuses the end offsets at once and answers the start offsets a moment later."""

    answered: list[str] = field(default_factory=list)

    async def start_offsets(self, topic: str) -> dict[int, int]:
        await asyncio.sleep(0.05)
        self.answered.append("start")
        return {0: 0}

    async def end_offsets(self, topic: str) -> dict[int, int]:
        raise LogError(f"kafka: not authorized to describe topics {topic}")

    async def offsets_for_time(self, topic: str, timestamp_ms: int) -> dict[int, int]:
        return {0: 0}

    async def read(
        self, topic: str, partition: int, start: int, end: int, *, key: bytes | None = None
    ) -> list[Record]:
        return []


async def test_a_refused_lookup_fails_the_bounds_only_after_the_other_lookups_ended() -> None:
    # Left running, the other lookup was cancelled by asyncio.run's shutdown mid-connect on Kafka, and the
    # leaked connection printed "Unclosed AIOKafkaConnection" beside `dlq list`'s one-line refusal.
    reader = RefusingReader()
    with pytest.raises(LogError, match="not authorized"):
        await offset_bounds(reader, "dead-letters", Window())
    assert reader.answered == ["start"]
