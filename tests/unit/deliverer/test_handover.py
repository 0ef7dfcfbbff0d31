"""What a rebalance does with the batch in hand (services.deliverer.handover), on a recording consumer."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping

import pytest

from services.deliverer.handover import Handover
from services.runtime.log import LogError, Record, TopicPartition

P0, P1 = TopicPartition("routed", 0), TopicPartition("routed", 1)


class CommitRefusedError(LogError):
    retriable = True


class Consumer:
    """Records commits; `assigned` is what the group assigns now."""

    def __init__(self, assigned: set[TopicPartition], refuse: bool = False) -> None:
        self.assigned = assigned
        self.refuse = refuse
        self.commits: list[dict[TopicPartition, int]] = []

    async def fetch(self, timeout: float, max_records: int = 500) -> list[Record]:
        return []

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if self.refuse:
            raise CommitRefusedError("kafka: commit: CommitFailedError")
        self.commits.append(dict(offsets))

    async def caught_up(self, ignoring: Collection[TopicPartition] = ()) -> bool:
        return True

    async def pause_at(self, tp: TopicPartition, offset: int) -> None:
        pass

    async def resume(self, tps: Collection[TopicPartition]) -> None:
        pass

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)


async def test_a_revocation_waits_for_the_batch_and_commits_it_before_the_partitions_move() -> None:
    consumer = Consumer({P0, P1})
    handover = Handover("routed", consumer=consumer)
    release = asyncio.Event()
    loop = asyncio.create_task(handover.run({P0: 5, P1: 7}, release.wait))
    await asyncio.sleep(0)
    revoking = asyncio.create_task(handover.revoked({P0, P1}))
    await asyncio.sleep(0)
    consumer.assigned = set()  # as KafkaConsumer reports while a rebalance takes them away
    assert not revoking.done()  # the group waits for the batch
    release.set()
    await revoking
    await loop
    assert consumer.commits == [{P0: 5, P1: 7}]  # once, by the revocation, before the partitions moved


async def test_the_loop_commits_only_partitions_still_assigned() -> None:
    consumer = Consumer({P0})  # P1 went to another member without a revocation of ours in between
    handover = Handover("routed", consumer=consumer)

    async def handled() -> None:
        return None

    await handover.run({P0: 3, P1: 4}, handled)
    assert consumer.commits == [{P0: 3}]


async def test_a_batch_still_running_at_the_deadline_is_abandoned_without_commit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = Consumer({P0})
    handover = Handover("routed", consumer=consumer, timeout=0.01, reachable=lambda: True)
    loop = asyncio.create_task(handover.run({P0: 9}, asyncio.Event().wait))
    await asyncio.sleep(0)
    await handover.revoked({P0})
    await loop  # returns: the loop goes on with its next fetch
    assert consumer.commits == []
    assert "abandoned, not committed" in caplog.text


async def test_time_while_the_broker_is_away_does_not_count_towards_abandoning_the_batch() -> None:
    # Seen in the chaos runs: a batch waiting for the broker to take its outcomes was abandoned by a
    # rebalance, and its next owner sent its copies again (duplicates).
    consumer = Consumer({P0})
    release = asyncio.Event()
    looks = 0

    def reachable() -> bool:  # the broker is away; it comes back (the batch publishes) on the 5th look
        nonlocal looks
        looks += 1
        if looks == 5:
            release.set()
        return False

    handover = Handover("routed", consumer=consumer, timeout=0.01, check_every=0.01, reachable=reachable)
    loop = asyncio.create_task(handover.run({P0: 4}, release.wait))
    await asyncio.sleep(0)
    await handover.revoked({P0})
    await loop
    assert consumer.commits == [{P0: 4}]  # finished and committed, not abandoned


async def test_a_commit_the_group_refuses_is_one_line_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    consumer = Consumer({P0}, refuse=True)
    handover = Handover("routed", consumer=consumer)

    async def handled() -> None:
        return None

    await handover.run({P0: 1}, handled)
    assert "commit refused, the group moved on" in caplog.text


async def test_a_revocation_of_other_partitions_does_not_wait() -> None:
    consumer = Consumer({P0, P1})
    handover = Handover("routed", consumer=consumer)
    release = asyncio.Event()
    loop = asyncio.create_task(handover.run({P0: 2}, release.wait))
    await asyncio.sleep(0)
    await handover.revoked({P1})
    assert consumer.commits == []
    release.set()
    await loop
    assert consumer.commits == [{P0: 2}]


def test_records_of_partitions_being_handed_over_are_left_to_their_next_owner() -> None:
    handover = Handover("routed", consumer=Consumer({P0}))
    records = [Record("routed", 0, 1, None, b"", 0), Record("routed", 1, 1, None, b"", 0)]
    assert handover.owned(records) == records[:1]
