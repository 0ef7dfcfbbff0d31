"""The Kafka producer across a broker stop, on a real broker (issue 13).

Sends in flight while the broker shuts down learn that their partition has no leader; after the request
timeout (40 s) aiokafka fails them, having numbered them (idempotence) without sending them. An aiokafka
producer that did so is refused every later batch (OutOfOrderSequenceNumber): seen in the chaos runs as a
deliverer that could never publish again and a fetcher that could not publish after an outage."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from schemas.topics import MAX_MESSAGE_BYTES, TopicSpec
from services.runtime import kafka
from services.runtime.kafka import KafkaLog, KafkaProducer
from services.runtime.log import LogError, Outgoing
from tests.support.kafka import start_local_broker, stop_local_broker

pytestmark = pytest.mark.integration

FAIL_WITHIN = 180.0  # seconds; aiokafka fails a batch without a leader after its request timeout (40 s)


async def test_a_producer_whose_sends_failed_while_the_broker_was_away_sends_again_when_it_is_back(
    own_broker: tuple[str, Path], kafka_topic_prefix: str
) -> None:
    bootstrap, directory = own_broker
    log = KafkaLog(bootstrap)
    topic = kafka_topic_prefix + "out"
    await log.ensure_topics([TopicSpec(topic, 1, {})])
    async with log.producer() as producer:
        await producer.send(Outgoing(topic, b"before", b"k"))
        failure = await failed_send_during_a_stop(producer, topic, directory)
        assert failure.retriable, failure
        restarted, problem = await asyncio.to_thread(start_local_broker, directory)
        assert restarted == bootstrap, problem
        written = await producer.send(Outgoing(topic, b"after", b"k"))
    read = await log.read(topic, 0, written.offset, written.offset + 1)
    assert [r.value for r in read] == [b"after"]


async def test_a_producer_retired_while_the_broker_is_away_lets_go_of_what_it_held_within_its_bound(
    own_broker: tuple[str, Path], kafka_topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A retired producer's stop() waits for every batch it holds, and aiokafka retries a batch until the
    # broker answers: without the bound, a stage stopping during an outage would wait for the broker.
    monkeypatch.setattr(kafka, "RETIRE_WITHIN", 1.0)
    bootstrap, directory = own_broker
    log = KafkaLog(bootstrap)
    topic = kafka_topic_prefix + "out"
    await log.ensure_topics([TopicSpec(topic, 1, {})])
    async with asyncio.timeout(120):  # the broker stays away for the rest of the test
        async with log.producer() as producer:
            await producer.send(Outgoing(topic, b"before", b"k"))
            await asyncio.to_thread(stop_local_broker, directory)
            held = Outgoing(topic, b"held", b"k")
            too_big = Outgoing(topic, bytes(MAX_MESSAGE_BYTES * 2), b"k")
            with pytest.raises(LogError, match="MessageSizeTooLarge"):  # "held" is with the producer now
                await producer.send_all([held, too_big])


async def failed_send_during_a_stop(producer: KafkaProducer, topic: str, directory: Path) -> LogError:
    """The error of a send in flight while the broker stops (sends keep going until it has stopped)."""
    stopped = asyncio.Event()
    sends: list[asyncio.Task[object]] = []

    async def keep_sending() -> None:
        while not stopped.is_set():
            sends.append(asyncio.create_task(producer.send(Outgoing(topic, b"during", b"k"))))
            await asyncio.sleep(0.01)

    sending = asyncio.create_task(keep_sending())
    await asyncio.to_thread(stop_local_broker, directory)
    stopped.set()
    await sending
    try:
        async with asyncio.timeout(FAIL_WITHIN):
            for send in asyncio.as_completed(sends):
                try:
                    await send
                except LogError as exc:
                    return exc
    finally:
        for send in sends:
            send.cancel()
        await asyncio.gather(*sends, return_exceptions=True)
    pytest.fail("every send made while the broker stopped succeeded: nothing was tested")
