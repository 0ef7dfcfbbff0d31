"""The log contract (services/runtime/log.py), once, for both implementations: Kafka and the embedded log.

A stage written against the Protocols must behave the same on either, so every test here runs on an
EmbeddedLog in a temporary directory and on a KafkaLog on the session's real broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from schemas.topics import TopicSpec
from services.runtime.embedded import EmbeddedLog
from services.runtime.kafka import KafkaLog
from services.runtime.log import Log, LogConsumer, Outgoing, Record, TopicPartition, next_offsets

pytestmark = pytest.mark.integration

PARTITIONS = 3
DEADLINE = 60.0  # a Kafka group's first join takes a few seconds


@dataclass(frozen=True)
class Subject:
    """One implementation under test, with a topic and a group name no other test uses."""

    log: Log
    topic: str
    group: str


@pytest.fixture(params=["embedded", "kafka"])
async def subject(request: pytest.FixtureRequest, tmp_path: Path, kafka_topic_prefix: str) -> Subject:
    log: Log
    if request.param == "embedded":
        log = EmbeddedLog(tmp_path)
    else:
        log = KafkaLog(request.getfixturevalue("kafka_bootstrap"))
    topic = f"{kafka_topic_prefix}contract"
    await log.ensure_topics([TopicSpec(topic, PARTITIONS)])
    return Subject(log, topic, f"{kafka_topic_prefix}group")


def outgoing(topic: str, count: int) -> list[Outgoing]:
    return [Outgoing(topic, b"value-%d" % i, key=b"key-%d" % (i % 5)) for i in range(count)]


async def read(consumer: LogConsumer, count: int, *, commit: bool = False) -> list[Record]:
    records: list[Record] = []
    give_up = time.monotonic() + DEADLINE
    while len(records) < count and time.monotonic() < give_up:
        batch = await consumer.fetch(1.0)
        records += batch
        if commit:
            await consumer.commit(next_offsets(batch))
    return records


def by_partition(records: Sequence[Record]) -> dict[int, list[bytes]]:
    result: dict[int, list[bytes]] = {}
    for record in records:
        result.setdefault(record.partition, []).append(record.value)
    return result


async def test_send_says_where_each_record_landed(subject: Subject) -> None:
    async with subject.log.producer() as producer:
        first = await producer.send(Outgoing(subject.topic, b"first", key=b"k"))
        written = await producer.send_all(outgoing(subject.topic, 20))
    assert first.topic == subject.topic
    assert first.offset == 0
    assert 0 <= first.partition < PARTITIONS
    for partition in range(PARTITIONS):
        offsets = [w.offset for w in [first, *written] if w.partition == partition]
        assert offsets == list(range(len(offsets)))  # dense, in the order sent
    same_key = {
        w.partition for r, w in zip(outgoing(subject.topic, 20), written, strict=True) if r.key == b"key-0"
    }
    assert len(same_key) == 1


async def test_a_new_group_reads_each_partition_from_the_start_in_send_order(subject: Subject) -> None:
    sent = outgoing(subject.topic, 30)
    async with subject.log.producer() as producer:
        written = await producer.send_all(sent)
    async with subject.log.consumer(subject.group, [subject.topic]) as consumer:
        got = await read(consumer, len(sent))
    expected: dict[int, list[bytes]] = {}
    for record, where in zip(sent, written, strict=True):
        expected.setdefault(where.partition, []).append(record.value)
    assert by_partition(got) == expected
    assert all(r.offset == i for p in expected for i, r in enumerate(x for x in got if x.partition == p))


async def test_a_new_consumer_of_the_group_resumes_after_the_commit(subject: Subject) -> None:
    topic = subject.topic
    async with subject.log.producer() as producer:
        await producer.send_all([Outgoing(topic, b"value-%d" % i, key=b"one key") for i in range(10)])
    async with subject.log.consumer(subject.group, [topic]) as consumer:
        first = await read(consumer, 4)
        partition = first[0].partition
        await consumer.commit({TopicPartition(topic, partition): 4})
    async with subject.log.consumer(subject.group, [topic]) as consumer:
        rest = await read(consumer, 6)
    assert [r.offset for r in rest] == list(range(4, 10))
    assert [r.value for r in rest] == [b"value-%d" % i for i in range(4, 10)]


async def test_caught_up_once_everything_is_read(subject: Subject) -> None:
    async with subject.log.producer() as producer:
        await producer.send_all(outgoing(subject.topic, 12))
    async with subject.log.consumer(subject.group, [subject.topic]) as consumer:
        assert not await consumer.caught_up()
        assert len(await read(consumer, 12, commit=True)) == 12
        assert await consumer.caught_up()


async def test_a_record_with_a_partition_lands_there_whatever_its_key(subject: Subject) -> None:
    async with subject.log.producer() as producer:
        written = await producer.send_all(
            [Outgoing(subject.topic, b"v%d" % i, key=b"key-%d" % i, partition=2) for i in range(5)]
        )
    assert {w.partition for w in written} == {2}


async def test_read_from_reads_each_partition_from_its_start_to_the_end(subject: Subject) -> None:
    async with subject.log.producer() as producer:
        await producer.send_all([Outgoing(subject.topic, b"v%d" % i, partition=i % 2) for i in range(10)])
    starts = {0: 2, 1: 0, 2: 7}  # partition 2 is empty: a start past its end reads nothing
    got = [record async for batch in subject.log.read_from(subject.topic, starts) for record in batch]
    assert by_partition(got) == {0: [b"v4", b"v6", b"v8"], 1: [b"v1", b"v3", b"v5", b"v7", b"v9"]}


async def test_a_paused_partition_is_read_again_from_its_pause_offset_once_resumed(subject: Subject) -> None:
    async with subject.log.producer() as producer:
        await producer.send_all([Outgoing(subject.topic, b"v%d" % i, partition=0) for i in range(4)])
        async with subject.log.consumer(subject.group, [subject.topic]) as consumer:
            first = await read(consumer, 4)
            tp = TopicPartition(subject.topic, 0)
            await consumer.pause_at(tp, 1)
            await producer.send(Outgoing(subject.topic, b"other", partition=1))
            assert [r.value for r in await read(consumer, 1)] == [b"other"]  # partition 0 gives nothing
            assert await consumer.caught_up(ignoring={tp})
            await consumer.resume({tp})
            again = await read(consumer, 3)
    assert [r.value for r in first] == [b"v0", b"v1", b"v2", b"v3"]
    assert [r.value for r in again] == [b"v1", b"v2", b"v3"]


async def test_one_reader_answers_lookups_and_ranged_reads_in_a_row(subject: Subject) -> None:
    assert isinstance(subject.log, KafkaLog | EmbeddedLog)
    async with subject.log.producer() as producer:
        await producer.send_all([Outgoing(subject.topic, b"v%d" % i, partition=i % 2) for i in range(20)])
    async with subject.log.reading() as reads:
        assert await reads.end_offsets(subject.topic) == {0: 10, 1: 10, 2: 0}
        assert await reads.start_offsets(subject.topic) == {0: 0, 1: 0, 2: 0}
        assert await reads.offsets_for_time(subject.topic, 2**62) == {0: 10, 1: 10, 2: 0}
        newest_first = [await reads.read(subject.topic, 0, a, b) for a, b in ((7, 10), (3, 7))]
        other = await reads.read(subject.topic, 1, 8, 99)  # past the end: up to the end
        again = await reads.read(subject.topic, 0, 3, 5)  # the partition read before, once more
        empty = await reads.read(subject.topic, 2, 0, 5)
        together = await asyncio.gather(*(reads.read(subject.topic, p, 0, 10) for p in (0, 1, 0, 1, 2, 0)))
    assert [[r.value for r in rs] for rs in together] == [
        [b"v%d" % i for i in range(p, 20, 2)] if p < 2 else [] for p in (0, 1, 0, 1, 2, 0)
    ]
    assert [[r.value for r in rs] for rs in newest_first] == [[b"v14", b"v16", b"v18"],
                                                             [b"v6", b"v8", b"v10", b"v12"]]
    assert [(r.offset, r.value) for r in other] == [(8, b"v17"), (9, b"v19")]
    assert [r.value for r in again] == [b"v6", b"v8"]
    assert empty == []


async def test_a_ranged_read_for_a_key_returns_only_that_keys_records_in_the_range(subject: Subject) -> None:
    assert isinstance(subject.log, KafkaLog | EmbeddedLog)
    keys = [b"a", b"b"] * 5
    async with subject.log.producer() as producer:
        await producer.send_all([Outgoing(subject.topic, b"v%d" % i, key=k, partition=0)
                                 for i, k in enumerate(keys)])
    async with subject.log.reading() as reads:
        found = await reads.read(subject.topic, 0, 2, 9, key=b"b")
        none = await reads.read(subject.topic, 0, 0, 10, key=b"c")
    assert [(r.offset, r.key, r.value) for r in found] == [(3, b"b", b"v3"), (5, b"b", b"v5"),
                                                           (7, b"b", b"v7")]
    assert none == []
