"""Offset lookups and ranged reads on one plain Kafka consumer kept open (`KafkaLog.reading`).

An ops command (`trace`, `dlq`) makes dozens of lookups and reads; a consumer started for each cost
0.1-0.8 s (bootstrap, metadata, the first request's metadata wait), most of a `popbridge trace` of
recent mail. Here one consumer, outside any group, answers them all: offset lookups concurrently,
ranged reads one at a time (a read assigns the consumer to its partition).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as KafkaTopicPartition

from services.runtime.log import Record


@dataclass
class KafkaReads:
    """The read side of services.runtime.ops_log.RangeReader on `consumer` (started by the caller, which
    also turns a KafkaError into the log's error). `describe` gives a topic's partitions (KafkaLog
    .partitions: it refuses a topic this user may not describe); asked once per topic."""

    consumer: AIOKafkaConsumer
    describe: Callable[[str], Awaitable[list[int]]]
    _partitions: dict[str, list[int]] = field(default_factory=dict)
    _reading: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def partitions(self, topic: str) -> list[int]:
        if topic not in self._partitions:
            self._partitions[topic] = await self.describe(topic)
        return self._partitions[topic]

    async def _tps(self, topic: str) -> list[KafkaTopicPartition]:
        return [KafkaTopicPartition(topic, p) for p in await self.partitions(topic)]

    async def start_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset of the earliest record still kept."""
        starts = await self.consumer.beginning_offsets(await self._tps(topic))
        return {tp.partition: offset for tp, offset in starts.items()}

    async def end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset the next record written will get."""
        ends = await self.consumer.end_offsets(await self._tps(topic))
        return {tp.partition: offset for tp, offset in ends.items()}

    async def offsets_for_time(self, topic: str, timestamp_ms: int) -> dict[int, int]:
        """Per partition, the first offset whose record timestamp is >= `timestamp_ms`, else the end offset
        (the broker's time index answers)."""
        tps = await self._tps(topic)
        found = await self.consumer.offsets_for_times(dict.fromkeys(tps, timestamp_ms))
        ends = await self.consumer.end_offsets(tps)
        return {tp.partition: ends[tp] if found[tp] is None else found[tp].offset for tp in tps}

    async def read(self, topic: str, partition: int, start: int, end: int) -> list[Record]:
        """The records of one partition with `start <= offset < end` (offsets past the log end are ignored).
        What the consumer fetches is bounded by its fetch sizes (the caller's choice)."""
        tp = KafkaTopicPartition(topic, partition)
        async with self._reading:
            end = min(end, (await self.consumer.end_offsets([tp]))[tp])
            if start >= end:
                return []
            self.consumer.assign([tp])
            self.consumer.seek(tp, start)
            records: list[Record] = []
            try:
                while (position := await self.consumer.position(tp)) < end:
                    # Records are unpacked as they are taken: a fetch of compressed batches holds many
                    # more than the range (a newest-first read stops far before the log's end).
                    batches = await self.consumer.getmany(tp, timeout_ms=1000, max_records=end - position)
                    records += [Record(m.topic, m.partition, m.offset, m.key, m.value or b"", m.timestamp)
                                for m in batches.get(tp, []) if start <= m.offset < end]
            finally:
                # Nothing is fetched ahead for a partition read to its end (a newest-first read goes
                # backwards: what follows was read already).
                self.consumer.pause(tp)
            return records
