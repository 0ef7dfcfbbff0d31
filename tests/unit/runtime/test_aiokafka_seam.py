"""The one place popbridge relies on aiokafka's internals (services.runtime.kafka.fail_pending).

A retired producer that cannot fail what it holds never stops; an `except` around the call would hide that
in a log line at debug, so this fails loudly on an aiokafka release that moves it, before a deployment does.
"""

from __future__ import annotations

from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition

from services.runtime.kafka import fail_pending


async def test_a_batch_the_producer_holds_fails_and_its_sender_sees_the_failure() -> None:
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9", enable_idempotence=True, acks="all")
    try:
        # Not started: the batch waits in the accumulator, as it does while the broker is away.
        sent = await producer._message_accumulator.add_message(
            TopicPartition("seam", 0), key=None, value=b"x", timeout=1.0, timestamp_ms=None
        )
        fail_pending(producer)
        assert sent.done()
        assert "producer retired" in str(sent.exception())
    finally:
        await producer.stop()
