"""services/ops/reader.py on the embedded log: a key's records found without building the others."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from schemas.topics import TopicSpec
from services.ops.locate import KeyRead, Window
from services.ops.reader import keyed
from services.runtime.embedded import EmbeddedLog
from services.runtime.log import Outgoing, Record


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
