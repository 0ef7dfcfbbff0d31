"""Offset lookups and ranged reads on a few plain Kafka consumers kept open (`KafkaLog.reading`).

An ops command (`trace`, `dlq`) makes dozens of lookups and reads; a consumer started for each cost
0.1-0.8 s (bootstrap, metadata, the first request's metadata wait), most of a `popbridge trace` of
recent mail. Here a few consumers, outside any group, answer them all: offset lookups on the first one,
concurrently; a ranged read assigns a consumer to its partition, so concurrent reads take one each, up
to READERS (a trace reads four topics at once: its reads overlap the broker's fetches with the
unpacking: 1.9 -> 0.9 s for a 3-day-old message among 1M records a topic, load 3), each the idle one
that read its topic last (`idle_reader`). A read for a key builds a Record only for that key's records.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.structs import ConsumerRecord

from services.runtime.log import Record, kept

READERS = 4  # consumers at most, each with its fetch buffer (1 MiB a partition): the bound on memory


def record_of(m: ConsumerRecord[bytes, bytes]) -> Record:
    return Record(m.topic, m.partition, m.offset, m.key, m.value or b"", m.timestamp)


def idle_reader(topic: str, idle: Sequence[Collection[str]]) -> int:
    """Which idle consumer a read of `topic` takes, given each one's assigned topics (the most recently
    freed last): the latest that read `topic`, else the latest freed. aiokafka's assign replaces the
    client's topics, so moving a consumer to another topic waits for a metadata round: 47 ms a read,
    against 5 ms on the topic it read before (load 2); a trace's four topics read at once swapped them."""
    return next((i for i in reversed(range(len(idle))) if topic in idle[i]), len(idle) - 1)


@dataclass
class KafkaReads:
    """The read side of services.runtime.ops_log.RangeReader. `start` gives a started consumer (the
    caller stops it when the reads are over, and turns a KafkaError into the log's error). `describe`
    gives a topic's partitions (KafkaLog.partitions: it refuses a topic this user may not describe);
    asked once per topic."""

    start: Callable[[], Awaitable[AIOKafkaConsumer]]
    describe: Callable[[str], Awaitable[list[int]]]
    _partitions: dict[str, asyncio.Future[list[int]]] = field(default_factory=dict)
    _idle: list[AIOKafkaConsumer] = field(default_factory=list)
    _first: AIOKafkaConsumer | None = None
    _starting: asyncio.Lock = field(default_factory=asyncio.Lock)
    _readers: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(READERS))

    async def _lookups(self) -> AIOKafkaConsumer:
        """The consumer offset lookups go to (the first started)."""
        async with self._starting:
            if self._first is None:
                self._first = await self.start()
                self._idle.append(self._first)
        return self._first

    @asynccontextmanager
    async def _reader(self, topic: str) -> AsyncIterator[AIOKafkaConsumer]:
        """A consumer no other read holds: an idle one (one that last read `topic` if any), else a new one
        (READERS at most)."""
        async with self._readers:
            await self._lookups()
            if self._idle:
                reader = self._idle.pop(idle_reader(topic, [{tp.topic for tp in c.assignment()}
                                                            for c in self._idle]))
            else:
                reader = await self.start()
            try:
                yield reader
            finally:
                self._idle.append(reader)

    async def partitions(self, topic: str) -> list[int]:
        # The lookup itself is kept, not its answer: lookups asked at once (offset_bounds' start and end)
        # share one describe, where each started its own admin client.
        if topic not in self._partitions:
            self._partitions[topic] = asyncio.ensure_future(self.describe(topic))
        return await self._partitions[topic]

    async def _tps(self, topic: str) -> list[KafkaTopicPartition]:
        return [KafkaTopicPartition(topic, p) for p in await self.partitions(topic)]

    async def start_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset of the earliest record still kept."""
        starts = await (await self._lookups()).beginning_offsets(await self._tps(topic))
        return {tp.partition: offset for tp, offset in starts.items()}

    async def end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset the next record written will get."""
        ends = await (await self._lookups()).end_offsets(await self._tps(topic))
        return {tp.partition: offset for tp, offset in ends.items()}

    async def offsets_for_time(self, topic: str, timestamp_ms: int) -> dict[int, int]:
        """Per partition, the first offset whose record timestamp is >= `timestamp_ms`, else the end offset
        (the broker's time index answers)."""
        tps, consumer = await self._tps(topic), await self._lookups()
        found = await consumer.offsets_for_times(dict.fromkeys(tps, timestamp_ms))
        ends = await consumer.end_offsets(tps)
        return {tp.partition: ends[tp] if found[tp] is None else found[tp].offset for tp in tps}

    async def read(
        self, topic: str, partition: int, start: int, end: int, *, key: bytes | None = None
    ) -> list[Record]:
        """The records of one partition with `start <= offset < end` (offsets past the log end are ignored),
        only those keyed `key` when given. What the consumer fetches is bounded by its fetch sizes (the
        caller's choice)."""
        tp = KafkaTopicPartition(topic, partition)
        async with self._reader(topic) as consumer:
            # Assigned before the end is asked: the assignment requests the topic's metadata, which the
            # lookup then waits for; asked first, a consumer new to the topic waited aiokafka's retry
            # backoff (StaleMetadata, 100 ms) before its first read.
            consumer.assign([tp])
            consumer.seek(tp, start)
            records: list[Record] = []
            try:
                end = min(end, (await consumer.end_offsets([tp]))[tp])
                while (position := await consumer.position(tp)) < end:
                    # Records are unpacked as they are taken: a fetch of compressed batches holds many
                    # more than the range (a newest-first read stops far before the log's end).
                    batches = await consumer.getmany(tp, timeout_ms=1000, max_records=end - position)
                    records += [record_of(m) for m in batches.get(tp, [])
                                if kept(m.offset, m.key, start, end, key)]
            finally:
                # Nothing is fetched ahead for a partition read to its end (a newest-first read goes
                # backwards: what follows was read already).
                consumer.pause(tp)
            return records
