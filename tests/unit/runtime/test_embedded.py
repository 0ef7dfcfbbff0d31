"""services/runtime/embedded.py: the SQLite log a one-machine install runs on."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from schemas.topics import MIB, TopicSpec
from services.runtime.embedded import (
    DB_NAME,
    EmbeddedLog,
    EmbeddedLogError,
    _process_gone,
    assign,
    partition_for_key,
)
from services.runtime.log import Log, LogConsumer, Outgoing, Record, TopicPartition, next_offsets
from services.runtime.ops_log import OpsLog

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
        assert time.monotonic() - started < 1


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


async def consume_until(
    consumer: LogConsumer, seen: list[Record], total: list[Record], expected: int
) -> None:
    """One stage's loop: fetch, handle, commit; until the group as a whole has seen `expected` records."""
    give_up = time.monotonic() + 20
    while len(total) < expected and time.monotonic() < give_up:
        batch = await consumer.fetch(0.1, max_records=5)
        seen += batch
        total += batch
        await consumer.commit(next_offsets(batch))


async def test_two_consumers_of_a_group_split_the_partitions_and_see_each_record_once(tmp_path: Path) -> None:
    log = await new_log(tmp_path, partitions=6)
    await produce(log, keyed(120, keys=50))
    seen_a: list[Record] = []
    seen_b: list[Record] = []
    total: list[Record] = []
    async with log.consumer("g", [TOPIC]) as a, log.consumer("g", [TOPIC]) as b:
        await asyncio.gather(consume_until(a, seen_a, total, 120), consume_until(b, seen_b, total, 120))
        assert await a.caught_up()
        assert await b.caught_up()
        members = await log.active_members("g")
    assert Counter(values(total)) == Counter(r.value for r in keyed(120, keys=50))  # each once
    assert {r.partition for r in seen_a}.isdisjoint({r.partition for r in seen_b})
    assert len({r.partition for r in seen_a}) == len({r.partition for r in seen_b}) == 3
    assert sorted(len(m.partitions) for m in members) == [3, 3]


async def test_a_consumer_joining_midway_takes_over_partitions_without_losing_a_record(
    tmp_path: Path,
) -> None:
    log = await new_log(tmp_path, partitions=6)
    await produce(log, keyed(60, keys=50))
    seen_a: list[Record] = []
    seen_b: list[Record] = []
    total: list[Record] = []
    async with log.consumer("g", [TOPIC]) as a:
        await consume_until(a, seen_a, total, 30)
        async with log.consumer("g", [TOPIC]) as b:
            more = asyncio.create_task(produce(log, keyed(60, keys=50, start=60)))
            await asyncio.gather(consume_until(a, seen_a, total, 120), consume_until(b, seen_b, total, 120))
            await more
    assert Counter(values(total)) == Counter(r.value for r in keyed(120, keys=50))
    assert seen_b, "the second consumer got partitions"


async def test_when_a_consumer_leaves_the_other_takes_its_partitions_from_the_commit(tmp_path: Path) -> None:
    log = await new_log(tmp_path, partitions=2)
    await produce(log, keyed(40))
    total: list[Record] = []
    async with log.consumer("g", [TOPIC]) as a:
        async with log.consumer("g", [TOPIC]) as b:
            await asyncio.gather(consume_until(a, [], total, 10), consume_until(b, [], total, 10))
        await consume_until(a, [], total, 40)
        assert await a.caught_up()
    assert Counter(values(total)) == Counter(r.value for r in keyed(40))


async def test_a_dead_consumers_partitions_move_on_from_its_committed_offset(tmp_path: Path) -> None:
    clock = FakeClock()
    log = await new_log(tmp_path, partitions=1)
    await produce(log, keyed(10))
    hung = EmbeddedLog(tmp_path, clock=clock)  # its heartbeats stay at `clock.now`
    later = EmbeddedLog(tmp_path, clock=FakeClock(clock.now + 11))  # 11 s on: that heartbeat is stale
    async with hung.consumer("g", [TOPIC]) as a:
        await read(a, 4)
        async with later.consumer("g", [TOPIC]) as b:
            rest = await read(b, 6)
            assert await b.caught_up()
    assert values(rest) == [b"value-%d" % i for i in range(4, 10)]


CHILD_CONSUMER = """
import asyncio, sys
from pathlib import Path
from services.runtime.embedded import EmbeddedLog
from services.runtime.log import next_offsets

async def main() -> None:
    async with EmbeddedLog(Path(sys.argv[1])).consumer("g", ["mail"]) as consumer:
        records = await consumer.fetch(10, max_records=3)
        await consumer.commit(next_offsets(records))
        print(len(records), flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_consumer_killed_in_another_process_hands_its_partitions_on(tmp_path: Path) -> None:
    log = await new_log(tmp_path, partitions=1)
    await produce(log, keyed(10))
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD_CONSUMER, str(tmp_path), stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    assert await child.stdout.readline() == b"3\n"
    (member,) = await log.active_members("g")
    assert member.client.endswith(f":{child.pid}")
    assert member.partitions == (TopicPartition(TOPIC, 0),)
    child.send_signal(signal.SIGKILL)
    await child.wait()
    later = EmbeddedLog(tmp_path, clock=lambda: time.time() + 11)  # the child's last heartbeat is stale
    async with later.consumer("g", [TOPIC]) as consumer:
        assert values(await read(consumer, 7)) == [b"value-%d" % i for i in range(3, 10)]


async def test_commits_never_move_a_group_backwards(tmp_path: Path) -> None:
    log = await new_log(tmp_path, partitions=1)
    await produce(log, keyed(5))
    async with log.consumer("g", [TOPIC]) as consumer:
        await consumer.commit({TopicPartition(TOPIC, 0): 4})
        await consumer.commit({TopicPartition(TOPIC, 0): 2})  # a late commit from an earlier owner
    assert await log.committed("g", TOPIC) == {0: 4}


def test_round_robin_assignment_deals_partitions_to_subscribed_members_only() -> None:
    tps = [TopicPartition(t, p) for t in ("a", "b") for p in range(3)]
    even = assign({"m1": ["a", "b"], "m2": ["a", "b"], "m3": ["a", "b"]}, tps)
    assert Counter(even.values()) == Counter({"m1": 2, "m2": 2, "m3": 2})
    uneven = assign({"m1": ["a", "b"], "m2": ["a"]}, tps)
    assert all(uneven[TopicPartition("b", p)] == "m1" for p in range(3))
    assert "m2" in uneven.values()
    assert assign({}, tps) == {}


# Admin operations.


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


async def test_set_committed_is_refused_while_the_group_has_a_live_consumer(tmp_path: Path) -> None:
    log = await new_log(tmp_path, partitions=1)
    await produce(log, keyed(10))
    tp = TopicPartition(TOPIC, 0)
    async with log.consumer("g", [TOPIC]):
        with pytest.raises(EmbeddedLogError, match="live consumer") as refused:
            await log.set_committed("g", {tp: 3})
        assert not refused.value.retriable
        assert [m.partitions for m in await log.active_members("g")] == [(tp,)]
    assert await log.active_members("g") == []
    assert await log.set_committed("g", {tp: 3}) == {tp: 3}
    assert await log.set_committed("g", {tp: 99}) == {tp: 10}  # clamped to the end
    await log.set_committed("g", {tp: 3})
    async with log.consumer("g", [TOPIC]) as consumer:
        assert values(await read(consumer, 7)) == [b"value-%d" % i for i in range(3, 10)]
    assert await log.groups() == ["g"]


async def test_compaction_keeps_the_latest_record_of_each_key(tmp_path: Path) -> None:
    log = await new_log(tmp_path, partitions=2, config={"cleanup.policy": "compact"})
    await produce(
        log, [Outgoing(TOPIC, b"%s-v%d" % (k, v), key=k) for v in range(3) for k in (b"a", b"b", b"c")]
    )
    ends = await log.end_offsets(TOPIC)
    assert await log.clean_up() == {TOPIC: 6}
    assert await log.end_offsets(TOPIC) == ends  # offsets are never reused
    async with log.consumer("g", [TOPIC]) as consumer:
        assert sorted(values(await read(consumer, 3))) == [b"a-v2", b"b-v2", b"c-v2"]
        assert await consumer.caught_up()
    async with log.producer() as producer:
        with pytest.raises(EmbeddedLogError, match="needs a key"):
            await producer.send(Outgoing(TOPIC, b"no key"))


async def test_retention_deletes_records_older_than_retention_ms(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    log = EmbeddedLog(tmp_path, clock=clock)
    await log.ensure_topics([TopicSpec(TOPIC, 1, {"retention.ms": "60000"})])
    await produce(log, keyed(3))
    clock.now += 120
    await produce(log, keyed(2, start=3))
    assert await log.expire(TOPIC) == 3
    assert await log.start_offsets(TOPIC) == {0: 3}
    async with log.consumer("g", [TOPIC]) as consumer:
        assert values(await read(consumer, 2)) == [b"value-3", b"value-4"]


# Errors and limits.


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


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


async def test_a_member_gets_a_moving_partition_only_after_the_old_owners_on_revoked_returned(
    tmp_path: Path,
) -> None:
    log = await new_log(tmp_path, partitions=4)
    in_flight = asyncio.Event()  # the old owner's work on what it is losing: ends when the test says
    revoked: list[set[TopicPartition]] = []

    async def on_revoked(tps: set[TopicPartition]) -> None:
        revoked.append(tps)
        await in_flight.wait()

    async def keep_fetching(consumer: LogConsumer) -> None:
        while True:
            await consumer.fetch(0.05)

    async with log.consumer("g", [TOPIC], on_revoked=on_revoked) as a:
        await a.fetch(0.05)
        everything = {TopicPartition(TOPIC, p) for p in range(4)}
        assert a.assignment() == everything
        a_fetches = asyncio.create_task(keep_fetching(a))
        async with log.consumer("g", [TOPIC]) as b:
            b_fetches = asyncio.create_task(keep_fetching(b))
            await eventually(lambda: bool(revoked))
            losing = revoked[0]
            assert len(losing) == 2
            await asyncio.sleep(0.5)  # several fetches of b, while a's callback still waits
            assert b.assignment() == set()
            assert a.assignment() == everything  # a still holds them
            in_flight.set()
            await eventually(lambda: b.assignment() == losing)
            assert a.assignment() == everything - losing
            assert revoked == [losing]  # called once per handover
            b_fetches.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await b_fetches
        a_fetches.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await a_fetches


def test_a_member_whose_process_is_gone_is_dead_at_once() -> None:

    host = socket.gethostname()
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{zombie.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert _process_gone(f"{host}:{exited.pid}")
        assert _process_gone(f"{host}:{zombie.pid}")
        assert not _process_gone(f"{host}:{running.pid}")
        assert not _process_gone(f"{host}:{os.getpid()}")
        assert not _process_gone(f"another-{host}:{exited.pid}")
    finally:
        running.kill()
        running.wait()
        zombie.wait()


# --- file permissions: the database holds raw mail -------------------------------------------------------


@contextlib.contextmanager
def permissive_umask() -> Iterator[None]:
    """umask 000, so the modes checked come from popbridge, not from a strict umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


async def test_the_data_directory_is_0700_and_every_database_file_0600(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"
    with permissive_umask():
        log = EmbeddedLog(data_dir)
        await log.ensure_topics([TopicSpec(TOPIC, 1)])
        async with log.producer() as producer:
            await producer.send_all([Outgoing(TOPIC, b"Subject: private\r\n\r\nmail", b"k")])
        modes = {p.name: p.stat().st_mode & 0o777 for p in data_dir.iterdir()}
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert modes[DB_NAME] == 0o600
    assert set(modes.values()) == {0o600}, modes  # the -wal and -shm files too


async def test_a_wider_data_directory_or_database_is_reported_once_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await EmbeddedLog(tmp_path / "data").ensure_topics([TopicSpec(TOPIC, 1)])
    (tmp_path / "data").chmod(0o755)
    (tmp_path / "data" / DB_NAME).chmod(0o644)
    EmbeddedLog(tmp_path / "data")
    EmbeddedLog(tmp_path / "data")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"{tmp_path / 'data'} is mode 0755: other local users may read the mail it holds; "
        f"chmod 0700 {tmp_path / 'data'}",
        f"{tmp_path / 'data' / DB_NAME} is mode 0644: other local users may read the mail it holds; "
        f"chmod 0600 {tmp_path / 'data' / DB_NAME}",
    ]
