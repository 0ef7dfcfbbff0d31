"""services.router.faust_patches against faust's own consumer bookkeeping (no broker: the consumer is
built, not started). Each case runs on faust's stock consumer too, to show the patch is still needed:
when an upgrade of faust fixes one, its `stock` case fails and says which override can go."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import faust
import pytest
from faust.types import TP
from faust.types.tuples import ConsumerMessage

from services.router.faust_patches import RouterApp, SafeConsumer, contiguous_end

TOPIC = "popbridge.mail.fetched"
PART = TP(TOPIC, 0)


@pytest.mark.parametrize(
    ("start", "acked", "expected"),
    [
        (10, [], (10, 0)),
        (10, [10, 11, 12], (13, 3)),
        (10, [11, 12], (10, 0)),  # 10 not processed: nothing to commit, however close the rest is
        (10, [8, 9, 10, 12], (11, 3)),  # 8 and 9 were committed before (stale acks)
        (0, [0, 1, 3], (2, 2)),
    ],
)
def test_the_commit_covers_only_the_run_of_processed_offsets_from_the_committed_one(
    start: int, acked: list[int], expected: tuple[int, int]
) -> None:
    assert contiguous_end(start, acked) == expected


def make_app(kind: type[faust.App]) -> faust.App:
    app = kind("patches-test", broker="kafka://127.0.0.1:9", autodiscover=False, web_enabled=False)
    app.topics.acking_topics.add(TOPIC)  # as the conductor does for a topic an agent reads with acks
    app.consumer_generation_id = 3
    return app


@asynccontextmanager
async def consumer_of(kind: type[faust.App]) -> AsyncIterator[Any]:
    app = make_app(kind)
    app.flow_control.resume()
    built: Any = app.consumer
    yield built
    built._thread.thread_loop.close()  # built for the consumer's thread, never started here


@pytest.fixture(params=[RouterApp, faust.App], ids=["patched", "stock"])
async def consumer(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    async with consumer_of(request.param) as built:
        yield built


@pytest.fixture
async def patched_consumer() -> AsyncIterator[Any]:
    """Only ours: for the corrections stock faust has no counterpart of."""
    async with consumer_of(RouterApp) as built:
        yield built


def message(offset: int, *, generation: int = 3) -> ConsumerMessage:
    return ConsumerMessage(
        TOPIC, 0, offset, 0.0, 0, None, b"k", b"v", None, tp=PART, generation_id=generation
    )


def sought_to(consumer: Any, committed: int | None, *, log_start: int = 0) -> None:
    """As after the seek to the committed offsets: faust's bookkeeping, and where reading began."""
    consumer._committed_offset[PART] = committed or None  # faust keeps None for 0 and for no commit
    consumer._start_offset = {PART: max(committed or 0, log_start)}


def processed(consumer: Any, *offsets: int) -> None:
    """The agent finished these records (the stream acks each one as the agent moves on)."""
    for offset in offsets:
        message(offset).ack(consumer)


def patched(consumer: Any) -> bool:
    return isinstance(consumer, SafeConsumer)


def no_seeks(consumer: Any) -> list[tuple[TP, int]]:
    sought: list[tuple[TP, int]] = []

    async def seek(tp: TP, offset: int) -> None:
        sought.append((tp, offset))

    consumer.seek = seek
    return sought


async def test_a_record_in_flight_at_the_committed_offset_holds_the_commit(consumer: Any) -> None:
    # faust-streaming#606: committed 2585, 2586..2589 done, 2585 still in the agent.
    sought_to(consumer, 2585)
    in_flight = message(2585)
    consumer._unacked_messages.add(in_flight)
    processed(consumer, 2586, 2587, 2588, 2589)
    assert consumer._new_offset(PART) == (None if patched(consumer) else 2590)


async def test_with_nothing_committed_yet_the_commit_starts_at_the_first_offset(consumer: Any) -> None:
    sought_to(consumer, None)
    consumer._unacked_messages.add(message(0))
    processed(consumer, 1, 2)
    assert consumer._new_offset(PART) == (None if patched(consumer) else 3)
    processed(consumer, 0)
    assert consumer._new_offset(PART) == (3 if patched(consumer) else 1)  # stock: the commit goes back


async def test_offsets_the_fetcher_jumped_over_are_not_taken_as_processed(consumer: Any) -> None:
    sought_to(consumer, 5)
    processed(consumer, 5)
    await consumer._add_gap(PART, 6, 8)  # the drain loop saw offset 8 after 5: 6 and 7 never came
    processed(consumer, 8)
    sought = no_seeks(consumer)
    assert consumer._new_offset(PART) == (6 if patched(consumer) else 9)
    assert sought == []


async def test_a_record_the_stream_skipped_in_a_rebalance_is_not_taken_as_processed(consumer: Any) -> None:
    sought_to(consumer, 40)
    consumer.app.flow_control.suspend()  # a rebalance began; the stream takes 40 and skips it
    message(40).ack(consumer)
    consumer.app.flow_control.resume()
    message(41, generation=2).ack(consumer)  # fetched before the last rebalance: skipped too
    assert consumer._new_offset(PART) == (None if patched(consumer) else 42)
    assert not consumer._unacked_messages  # either way the record does not hold up a revocation


async def test_records_dropped_before_processing_are_read_again(patched_consumer: Any) -> None:
    consumer = patched_consumer  # stock faust has no such recovery (it commits past them or waits for ever)
    sought_to(consumer, 20)
    sought = no_seeks(consumer)
    processed(consumer, 23, 24)  # 20..22 were dropped: not processed, not in flight
    assert consumer._new_offset(PART) is None
    assert consumer._new_offset(PART) is None  # asked again soon after: not sought back twice
    for task in list(consumer._seeks):
        await task
    assert sought == [(PART, 20)]


async def test_offsets_retention_deleted_below_the_committed_one_are_not_waited_for(
    patched_consumer: Any,
) -> None:
    consumer = patched_consumer  # stock faust skips a head hole of one offset, waits for ever on longer ones
    sought_to(consumer, 5, log_start=10)  # down longer than the retention: Kafka reset to the log start
    processed(consumer, 10, 11)
    assert consumer._new_offset(PART) == 12


@pytest.mark.parametrize("kind", [RouterApp, faust.App], ids=["patched", "stock"])
async def test_resuming_the_flow_keeps_what_the_queues_hold(kind: type[faust.App]) -> None:
    # After a rebalance faust resumes the flow once it sought to the committed offsets; what the fetcher
    # delivered in between sits in the queues (cause 1).
    app = make_app(kind)
    queue = app.FlowControlQueue(maxsize=10, clear_on_resume=True)  # as faust makes a stream's queue
    queue.put_nowait(message(7))
    app.flow_control.resume()
    assert queue.qsize() == (1 if kind is RouterApp else 0)
    queue.put_nowait(message(8))
    app.flow_control.clear()  # what a revocation does, patched or not
    assert queue.qsize() == 0
