"""Throughput of the embedded log (services/runtime/embedded/): send and consume, 1 KB and 100 KB values.

    .venv/bin/python bench/embedded_log.py [--records N] [--dir PATH] [--synchronous FULL|NORMAL]

Sends are timed three ways: one at a time (a fetcher awaiting each mail), 16 concurrent senders on one
producer (group commit: they share a transaction and its fsync) and `send_all` batches of 100. Consume
is one group consumer reading everything back. --dir matters: fsync costs what the filesystem says.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

from schemas.topics import MIB, TopicSpec
from services.runtime.embedded import EmbeddedLog, Synchronous
from services.runtime.log import LogProducer, Outgoing, next_offsets

SIZES = {"1 KB": 1024, "100 KB": 100 * 1024}
CONCURRENCY = 16
BATCH = 100


async def _one_at_a_time(producer: LogProducer, records: list[Outgoing]) -> None:
    for record in records:
        await producer.send(record)


async def _concurrent(producer: LogProducer, records: list[Outgoing]) -> None:
    async def sender(share: list[Outgoing]) -> None:
        for record in share:
            await producer.send(record)

    await asyncio.gather(*(sender(records[i::CONCURRENCY]) for i in range(CONCURRENCY)))


async def _batched(producer: LogProducer, records: list[Outgoing]) -> None:
    for start in range(0, len(records), BATCH):
        await producer.send_all(records[start : start + BATCH])


SENDS: dict[str, Callable[[LogProducer, list[Outgoing]], Awaitable[None]]] = {
    "send, one at a time": _one_at_a_time,
    f"send, {CONCURRENCY} concurrent": _concurrent,
    f"send_all, batches of {BATCH}": _batched,
}


def _report(what: str, count: int, size: int, seconds: float) -> None:
    print(f"  {what:<28} {count / seconds:>9.0f} records/s {count * size / MIB / seconds:>8.1f} MB/s")


async def _consume(log: EmbeddedLog, topic: str, count: int) -> float:
    started = time.perf_counter()
    async with log.consumer("bench", [topic]) as consumer:
        seen = 0
        while seen < count:
            records = await consumer.fetch(1.0)
            seen += len(records)
            await consumer.commit(next_offsets(records))
    return time.perf_counter() - started


async def _bench(directory: Path, records: int, synchronous: Synchronous) -> None:
    log = EmbeddedLog(directory, synchronous=synchronous)
    print(f"embedded log in {directory}, synchronous={synchronous}")
    for label, size in SIZES.items():
        count = records if size < 10_000 else max(1, records // 10)
        print(f"{label} values, {count} records per run")
        for name, send in SENDS.items():
            topic = f"bench-{size}-{name.split(',')[0]}-{len(name)}"
            await log.ensure_topics([TopicSpec(topic, 6)])
            batch = [Outgoing(topic, os.urandom(size), key=b"%d" % i) for i in range(count)]
            async with log.producer() as producer:
                started = time.perf_counter()
                await send(cast(LogProducer, producer), batch)
                _report(name, count, size, time.perf_counter() - started)
        _report("consume (one group member)", count, size, await _consume(log, topic, count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000, help="records per run of 1 KB (100 KB: a tenth)")
    parser.add_argument("--dir", type=Path, help="where the database goes (default: a temporary directory)")
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL")
    args = parser.parse_args()
    synchronous = cast(Synchronous, args.synchronous)
    if args.dir:
        asyncio.run(_bench(args.dir, args.records, synchronous))
        return
    with tempfile.TemporaryDirectory(prefix="popbridge-bench-") as directory:
        asyncio.run(_bench(Path(directory), args.records, synchronous))


if __name__ == "__main__":
    main()
