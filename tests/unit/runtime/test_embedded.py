"""services/runtime/embedded/ (log.py, records.py): the SQLite log a one-machine install runs on: what it
offers, ordering, partitioning, time, durability across processes and kill -9, limits.

Consumer groups, retention and file modes are tested in tests/unit/runtime/embedded/.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from schemas.topics import MIB, TopicSpec
from services.runtime.embedded import DB_NAME, EmbeddedLog, EmbeddedLogError, partition_for_key
from services.runtime.log import Log, Outgoing
from services.runtime.ops_log import OpsLog
from tests.support.embedded_log import TOPIC, FakeClock, keyed, new_log, produce, read, values


def test_the_embedded_log_offers_what_the_stages_and_the_ops_commands_use(tmp_path: Path) -> None:
    embedded = EmbeddedLog(tmp_path)  # nothing is opened until used
    as_log: Log = embedded  # mypy checks the Protocols
    as_ops: OpsLog = embedded
    assert as_log.end_offsets == as_ops.end_offsets


# Producing and consuming.


async def test_each_partition_reads_back_in_the_order_it_was_written(tmp_path: Path) -> None:
    log = await new_log(tmp_path)
    sent = keyed(60)
    async with log.producer() as producer:
        written = [await producer.send(r) for r in sent]
    async with log.consumer("g", [TOPIC]) as consumer:
        got = await read(consumer, 60)
    for partition in range(3):
        expected = [r.value for r, w in zip(sent, written, strict=True) if w.partition == partition]
        assert values([r for r in got if r.partition == partition]) == expected
        assert [r.offset for r in got if r.partition == partition] == list(range(len(expected)))


async def test_a_key_always_lands_on_the_same_partition_and_keyless_records_spread(tmp_path: Path) -> None:
    log = await new_log(tmp_path, partitions=6)
    async with log.producer() as producer:
        keyed_writes = await producer.send_all([Outgoing(TOPIC, b"x", key=b"alice")] * 5)
        keyless_writes = await producer.send_all([Outgoing(TOPIC, b"x")] * 6)
    assert {w.partition for w in keyed_writes} == {partition_for_key(b"alice", 6)}
    assert sorted(w.partition for w in keyless_writes) == list(range(6))
    assert partition_for_key(b"alice", 6) == 5  # crc32: the same in every process and every release


async def test_records_carry_their_append_time(tmp_path: Path) -> None:
    clock = FakeClock()
    log = EmbeddedLog(tmp_path, clock=clock)
    await log.ensure_topics([TopicSpec(TOPIC, 1)])
    await produce(log, keyed(1))
    async with log.consumer("g", [TOPIC]) as consumer:
        (record,) = await read(consumer, 1)
    assert record.timestamp_ms == int(clock.now * 1000)


async def test_a_reopened_log_resumes_the_group_after_its_commit(tmp_path: Path) -> None:
    log = await new_log(tmp_path)
    await produce(log, keyed(30))
    async with log.consumer("g", [TOPIC]) as consumer:
        first = await read(consumer, 12)
    reopened = EmbeddedLog(tmp_path)
    async with reopened.consumer("g", [TOPIC]) as consumer:
        rest = await read(consumer, 18)
        assert await consumer.caught_up()
        assert await consumer.fetch(0) == []
    assert sorted(values(first + rest)) == sorted(r.value for r in keyed(30))


async def test_caught_up_only_once_every_partition_is_read(tmp_path: Path) -> None:
    log = await new_log(tmp_path)
    await produce(log, keyed(9))
    async with log.consumer("g", [TOPIC]) as consumer:
        assert not await consumer.caught_up()
        await read(consumer, 8)
        assert not await consumer.caught_up()
        await read(consumer, 1)
        assert await consumer.caught_up()
        await produce(log, keyed(1))
        assert not await consumer.caught_up()


async def test_a_waiting_fetch_wakes_when_a_record_is_written(tmp_path: Path) -> None:
    log = await new_log(tmp_path)
    async with log.consumer("g", [TOPIC]) as consumer:
        waiting = asyncio.create_task(consumer.fetch(30))
        await asyncio.sleep(0)
        started = time.monotonic()
        await produce(log, keyed(1))
        assert values(await waiting) == [b"value-0"]
        # Woken by the write, not by its 30 s timeout; the margin is wide for a loaded machine.
        assert time.monotonic() - started < 10


CHILD_PRODUCER = """
import asyncio, sys
from pathlib import Path
from services.runtime.embedded import EmbeddedLog
from services.runtime.log import Outgoing

async def main() -> None:
    async with EmbeddedLog(Path(sys.argv[1])).producer() as producer:
        await producer.send(Outgoing("mail", b"from another process"))

asyncio.run(main())
"""


async def test_records_written_by_another_process_arrive_within_half_a_second(tmp_path: Path) -> None:
    log = await new_log(tmp_path)
    async with log.consumer("g", [TOPIC]) as consumer:
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD_PRODUCER, str(tmp_path))
        (record,) = await consumer.fetch(30)
        arrived_ms = time.time() * 1000
        assert await child.wait() == 0
    assert record.value == b"from another process"
    assert arrived_ms - record.timestamp_ms < 500


# Consumer groups.


async def test_offsets_for_time_finds_the_first_record_at_or_after_a_time(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    log = EmbeddedLog(tmp_path, clock=clock)
    await log.ensure_topics([TopicSpec(TOPIC, 2)])
    await produce(log, [Outgoing(TOPIC, b"early", key=b"k")] * 3)
    clock.now = 2000.0
    await produce(log, [Outgoing(TOPIC, b"late", key=b"k")] * 2)
    p = partition_for_key(b"k", 2)
    assert await log.offsets_for_time(TOPIC, 0) == {p: 0, 1 - p: 0}
    assert await log.offsets_for_time(TOPIC, 1_500_000) == {p: 3, 1 - p: 0}
    assert await log.offsets_for_time(TOPIC, 2_000_000) == {p: 3, 1 - p: 0}
    assert await log.offsets_for_time(TOPIC, 2_000_001) == {p: 5, 1 - p: 0}
    assert values(await log.read(TOPIC, p, 2, 4)) == [b"early", b"late"]
    assert await log.end_offsets(TOPIC) == {p: 5, 1 - p: 0}
    assert await log.end_offsets("no-such-topic") == {}


async def test_a_bad_request_fails_alone_while_concurrent_sends_still_land(tmp_path: Path) -> None:
    log = await new_log(tmp_path, config={"max.message.bytes": "100"})
    async with log.producer() as producer:
        outcomes = await asyncio.gather(
            producer.send(Outgoing(TOPIC, b"x" * 101)),
            producer.send(Outgoing("no-such-topic", b"x")),
            *(producer.send(r) for r in keyed(20)),
            return_exceptions=True,
        )
    too_big, unknown, *written = outcomes
    assert isinstance(too_big, EmbeddedLogError)
    assert "max.message.bytes" in str(too_big)
    assert not too_big.retriable
    assert isinstance(unknown, EmbeddedLogError)
    assert "unknown topic" in str(unknown)
    assert sum((await log.end_offsets(TOPIC)).values()) == len(written) == 20


async def test_a_fifty_megabyte_value_makes_the_round_trip(tmp_path: Path) -> None:
    log = await new_log(tmp_path, partitions=1)
    big = os.urandom(50 * MIB)
    await produce(log, [Outgoing(TOPIC, big, key=b"big"), Outgoing(TOPIC, b"small", key=b"big")])
    async with log.consumer("g", [TOPIC]) as consumer:
        got = await read(consumer, 2)
    assert [len(r.value) for r in got] == [50 * MIB, 5]
    assert got[0].value == big


async def test_a_database_from_a_newer_popbridge_is_refused(tmp_path: Path) -> None:
    await new_log(tmp_path)
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(EmbeddedLogError, match="newer popbridge"):
        await EmbeddedLog(tmp_path).end_offsets(TOPIC)


# Durability: kill -9 at a random moment loses nothing whose send() returned.

CRASHING_PRODUCER = """
import asyncio, hashlib, os, random, sys
from pathlib import Path
from schemas.topics import TopicSpec
from services.runtime.embedded import EmbeddedLog
from services.runtime.log import Outgoing

async def writer(producer, name: int) -> None:
    for i in range(1_000_000):
        value = b"%d-%d-" % (name, i) + os.urandom(random.choice((10, 1000, 200_000)))
        written = await producer.send(Outgoing("mail", value, key=None if i % 2 else value[:8]))
        print(written.partition, written.offset, hashlib.sha256(value).hexdigest(), flush=True)

async def main() -> None:
    log = EmbeddedLog(Path(sys.argv[1]))
    await log.ensure_topics([TopicSpec("mail", 3)])
    async with log.producer() as producer:
        await asyncio.gather(*(writer(producer, n) for n in range(4)))

asyncio.run(main())
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_every_record_whose_send_returned_survives_a_kill_9(tmp_path: Path, seed: int) -> None:
    kill_after = random.Random(seed).randrange(5, 400)  # lines printed, i.e. sends returned
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_PRODUCER, str(tmp_path), stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    confirmed = [await child.stdout.readline() for _ in range(kill_after)]
    child.send_signal(signal.SIGKILL)
    confirmed += (await child.stdout.read()).splitlines(keepends=True)
    assert await child.wait() == -signal.SIGKILL
    confirmed = [line for line in confirmed if line.endswith(b"\n")]  # a line cut by the kill proves nothing
    assert len(confirmed) >= kill_after
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    log = EmbeddedLog(tmp_path)
    for line in confirmed:
        partition, offset, digest = line.split()
        (record,) = await log.read("mail", int(partition), int(offset), int(offset) + 1)
        assert hashlib.sha256(record.value).hexdigest() == digest.decode()
