"""services/runtime/embedded/groups.py: consumer groups: splitting partitions, hand-over on join, leave,
death and on_revoked, commits, and moving a stopped group's offsets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from services.runtime.embedded import EmbeddedLog, EmbeddedLogError, assign
from services.runtime.embedded.groups import process_gone
from services.runtime.log import LogConsumer, Record, TopicPartition, next_offsets
from tests.support.embedded_log import TOPIC, FakeClock, eventually, keyed, new_log, produce, read, values


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


async def test_a_member_gets_a_moving_partition_only_after_the_old_owners_on_revoked_returned(
    tmp_path: Path,
) -> None:
    log = await new_log(tmp_path, partitions=4)
    in_flight = asyncio.Event()  # the old owner's work on what it is losing: ends when the test says
    revoked: list[set[TopicPartition]] = []

    async def on_revoked(tps: set[TopicPartition]) -> None:
        revoked.append(tps)
        await in_flight.wait()

    fetches = {"a": 0, "b": 0}

    async def keep_fetching(consumer: LogConsumer, name: str) -> None:
        while True:
            await consumer.fetch(0.05)
            fetches[name] += 1

    async with log.consumer("g", [TOPIC], on_revoked=on_revoked) as a:
        await a.fetch(0.05)
        everything = {TopicPartition(TOPIC, p) for p in range(4)}
        assert a.assignment() == everything
        a_fetches = asyncio.create_task(keep_fetching(a, "a"))
        async with log.consumer("g", [TOPIC]) as b:
            b_fetches = asyncio.create_task(keep_fetching(b, "b"))
            await eventually(lambda: bool(revoked))
            losing = revoked[0]
            assert len(losing) == 2
            seen = fetches["b"]
            await eventually(lambda: fetches["b"] >= seen + 5)  # several fetches of b; a's callback waits
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
    os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # waits for the exit, leaves it unreaped
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert process_gone(f"{host}:{exited.pid}")
        assert process_gone(f"{host}:{zombie.pid}")
        assert not process_gone(f"{host}:{running.pid}")
        assert not process_gone(f"{host}:{os.getpid()}")
        assert not process_gone(f"another-{host}:{exited.pid}")
    finally:
        running.kill()
        running.wait()
        zombie.wait()
