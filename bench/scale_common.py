"""What the scale benchmarks share: the row they print, the table, and filling a real broker fast.

A part of `bench/scale.py` is a module with `rows(args) -> list[Row]` (and optionally
`add_arguments(parser)` for its own flags). `fill` writes synthetic history straight to Kafka with one
tuned aiokafka producer (the producer, not the pipeline): events built from `schemas` and encoded with the
project's codec, sent without awaiting each record, batched by `linger_ms`/`max_batch_size` and
compressed (gzip: the only codec aiokafka needs no extra package for).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas.topics import MAX_MESSAGE_BYTES, TopicSpec
from services.ops.locate import kafka_partition


@dataclass(frozen=True)
class Row:
    """One figure: the old way (`before`), the new way (`after`), the goal, and what to know about it."""

    figure: str
    before: str
    after: str
    target: str
    note: str = ""


def table(rows: Sequence[Row]) -> str:
    """The markdown table every scale part prints."""
    lines = ["| figure | before | after | target | note |", "|---|---|---|---|---|"]
    lines += [f"| {r.figure} | {r.before} | {r.after} | {r.target} | {r.note} |" for r in rows]
    return "\n".join(lines)


def seconds(value: float) -> str:
    return f"{value:.2f} s" if value >= 0.1 else f"{value * 1000:.0f} ms"


@dataclass(frozen=True)
class Keyed:
    """One record to write: key, value and its timestamp (ms; CreateTime topics keep it)."""

    key: bytes
    value: bytes
    timestamp_ms: int | None = None


@dataclass(frozen=True)
class FillStats:
    topic: str
    records: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0


async def create_topics(bootstrap: str, specs: Sequence[TopicSpec]) -> None:
    """Create the topics (replication 1: the bench broker is one node); existing ones are kept."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(s.name, s.partitions, 1, topic_configs=dict(s.config)) for s in specs
               if s.name not in existing]
        if new:
            await admin.create_topics(new)
    finally:
        await admin.close()


async def fill(
    bootstrap: str, topic: str, records: Iterable[Keyed], *, linger_ms: int = 50,
    batch_bytes: int = 1024 * 1024, in_flight: int = 64, compression: str | None = "gzip",
) -> FillStats:
    """Write `records` to `topic` as fast as one producer can: records go straight into per-partition
    batches (`create_batch`/`send_batch`: no future per record), the partition picked as Kafka's default
    partitioner does (murmur2), up to `in_flight` batches unacknowledged (a bound on memory), acks=1 (a
    bench, not mail). Returns the count and the time it took."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks=1, linger_ms=linger_ms, max_batch_size=batch_bytes,
        compression_type=compression, max_request_size=MAX_MESSAGE_BYTES,
    )
    await producer.start()
    started = time.perf_counter()
    count = 0
    pending: list[asyncio.Future[object]] = []
    try:
        partitions = len(await producer.partitions_for(topic))
        batches = [producer.create_batch() for _ in range(partitions)]

        async def send(partition: int) -> None:
            batch, batches[partition] = batches[partition], producer.create_batch()
            pending.append(await producer.send_batch(batch, topic, partition=partition))
            if len(pending) >= in_flight:
                await asyncio.gather(*pending)
                pending.clear()

        for record in records:
            partition = kafka_partition(record.key, partitions)
            while batches[partition].append(key=record.key, value=record.value,
                                            timestamp=record.timestamp_ms) is None:
                if batches[partition].record_count() == 0:
                    raise ValueError(f"a record of {len(record.value)} bytes exceeds the batch size")
                await send(partition)
            count += 1
        for partition in range(partitions):
            if batches[partition].record_count():
                await send(partition)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return FillStats(topic, count, time.perf_counter() - started)


def vm_hwm_mb() -> float:
    """This process's peak RSS in MB. Not getrusage's ru_maxrss: Linux carries that over an exec, so a
    phase started from a bench that had filled a topic reports the bench's peak when it is higher."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0
