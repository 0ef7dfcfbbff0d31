"""services/fetcher/sharing.py: replicas follow the group assignment; a gained mailbox's memory is re-read."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

from schemas import codec
from schemas.events import FetchRecorded, fetch_state_key
from schemas.topics import TopicSpec
from services.fetcher.fetch_state import FetchMemory, open_memory
from services.fetcher.placement import Ownership
from services.fetcher.sharing import Handover, MemoryRefresh, Passes, hold_assignment
from services.runtime.embedded import EmbeddedLog
from services.runtime.log import Outgoing, Record, TopicPartition
from services.runtime.settings import Mailbox

TOPIC = "assignment"
STATE = "state"
MAILBOXES = tuple(f"box{n}" for n in range(20))
T = datetime(2026, 11, 27, tzinfo=UTC)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def replica(
    log: EmbeddedLog, ownership: Ownership, passes: Passes | None = None
) -> AsyncIterator[None]:
    on_revoked = None if passes is None else Handover(TOPIC, ownership, passes).revoked
    async with log.consumer("fetcher", [TOPIC], on_revoked=on_revoked) as consumer:
        task = asyncio.create_task(hold_assignment(consumer, TOPIC, ownership, every=0.05))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_two_replicas_own_disjoint_mailboxes_and_the_survivor_takes_all_over(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path)
    await log.ensure_topics([TopicSpec(TOPIC, 64)])
    a, b = Ownership(MAILBOXES), Ownership(MAILBOXES)
    async with replica(log, a):
        await until(lambda: a.owned == set(MAILBOXES))
        async with replica(log, b):
            await until(lambda: bool(b.owned) and a.owned | b.owned == set(MAILBOXES))
            await until(lambda: a.owned.isdisjoint(b.owned))
            assert 0 < len(a.owned) < len(MAILBOXES)
            assert b.stale == set(b.owned)  # gained: memory to be re-read before planning
        await until(lambda: a.owned == set(MAILBOXES))


def recorded(mailbox_id: str, uidl: str) -> Outgoing:
    record = FetchRecorded(
        mailbox_id=mailbox_id, uidl=uidl, fetch_id=f"f-{mailbox_id}-{uidl}", size=1, sha256="0" * 64,
        published_at=T,
    )  # fmt: skip
    return Outgoing(STATE, codec.encode(record), fetch_state_key(mailbox_id, uidl))


class GatedLog:
    """The embedded log, whose changelog reads wait for `gate` (so a test can hold a catch-up back)."""

    def __init__(self, log: EmbeddedLog) -> None:
        self.log = log
        self.catch_ups = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def end_offsets(self, topic: str) -> dict[int, int]:
        self.catch_ups += 1
        ends = await self.log.end_offsets(topic)  # the end is read when the catch-up starts
        await self.gate.wait()
        return ends

    async def read(self, topic: str, partition: int, start: int, end: int) -> list[Record]:
        return await self.log.read(topic, partition, start, end)

    async def write(self, records: list[Outgoing]) -> None:
        async with self.log.producer() as producer:
            await producer.send_all(records)


@contextlib.asynccontextmanager
async def state_topic(path: Path) -> AsyncIterator[tuple[GatedLog, FetchMemory]]:
    log = GatedLog(EmbeddedLog(path, synchronous="NORMAL"))
    await log.log.ensure_topics([TopicSpec(STATE, 2, {})])
    async with open_memory(log, STATE, None) as memory:
        log.catch_ups = 0
        yield log, memory


def mailbox(mailbox_id: str) -> Mailbox:
    return Mailbox(id=mailbox_id, host="127.0.0.1", username=mailbox_id)


def refresh_for(memory: FetchMemory) -> tuple[MemoryRefresh, Ownership]:
    ownership = Ownership(MAILBOXES)
    ownership.update(set(range(64)))
    return MemoryRefresh(memory, ownership), ownership


async def test_a_gained_mailbox_learns_what_the_previous_owner_published_before_planning(
    tmp_path: Path,
) -> None:
    async with state_topic(tmp_path) as (state, memory):
        await state.write([recorded("box1", "u1"), recorded("box2", "u9")])  # by the previous owner
        refresh, ownership = refresh_for(memory)
        await refresh.before_plan(mailbox("box1"))
        assert set(await memory.known("box1")) == {"u1"}
        assert not ownership.is_stale("box1")
        await refresh.before_plan(mailbox("box1"))
        assert state.catch_ups == 1  # fresh now: no more reads of the changelog


async def test_mailboxes_that_logged_in_together_share_one_catch_up_and_a_later_login_gets_its_own(
    tmp_path: Path,
) -> None:
    async with state_topic(tmp_path) as (state, memory):
        refresh, _ = refresh_for(memory)
        state.gate.clear()
        reading = asyncio.create_task(refresh.before_plan(mailbox("box1")))
        await until(lambda: state.catch_ups == 1)
        waiting = [asyncio.create_task(refresh.before_plan(mailbox(m))) for m in ("box2", "box3")]
        await asyncio.sleep(0.05)
        await state.write([recorded("box2", "late")])  # by the old owner, before box2's login completed
        state.gate.set()
        await asyncio.gather(reading, *waiting)
        assert state.catch_ups == 2  # box2 and box3 logged in after the first one began: one more for both
        assert set(await memory.known("box2")) == {"late"}


async def test_a_joining_replica_gets_a_mailbox_only_once_the_old_owners_pass_of_it_ended(
    tmp_path: Path,
) -> None:
    log = EmbeddedLog(tmp_path)
    await log.ensure_topics([TopicSpec(TOPIC, 64)])
    a, b, passes = Ownership(MAILBOXES), Ownership(MAILBOXES), Passes()
    gate = asyncio.Event()
    ended: dict[str, float] = {}

    async def slow_pass(mailbox_id: str) -> str:
        await gate.wait()
        ended[mailbox_id] = asyncio.get_running_loop().time()
        return mailbox_id

    async with replica(log, a, passes):
        await until(lambda: a.owned == set(MAILBOXES))
        running = [asyncio.create_task(passes.run(m, slow_pass(m))) for m in MAILBOXES]
        await asyncio.sleep(0)
        async with replica(log, b):
            await until(lambda: a.owned != set(MAILBOXES))  # revoked: no new pass starts
            handed = set(MAILBOXES) - a.owned
            await asyncio.sleep(0.5)  # many assignment checks of b
            assert b.owned == set()  # the passes of the revoked mailboxes still run
            gate.set()
            await until(lambda: b.owned == handed)
            gained = asyncio.get_running_loop().time()
            assert all(ended[m] < gained for m in handed)
        assert await asyncio.gather(*running) == list(MAILBOXES)  # finished, not aborted


async def test_a_revoked_mailboxs_pass_still_running_after_the_timeout_is_aborted() -> None:
    ownership, passes = Ownership(MAILBOXES, partitions=1), Passes()
    ownership.update({0})
    stuck = asyncio.create_task(passes.run("box0", asyncio.sleep(3600, result="late")))
    done = asyncio.create_task(passes.run("box1", asyncio.sleep(0, result="ok")))
    await asyncio.sleep(0)
    await Handover(TOPIC, ownership, passes, timeout=0.1).revoked({TopicPartition(TOPIC, 0)})
    assert ownership.owned == frozenset()
    assert await stuck is None
    assert await done == "ok"
    assert not passes.running("box0")
