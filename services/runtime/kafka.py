"""The Kafka implementation of the log interface (services.runtime.log), on aiokafka.

aiokafka's defaults are weaker than Java's (acks=1, no idempotence), so the producer sets
`acks="all"` and `enable_idempotence=True` explicitly: `send` returns only after every in-sync replica
has the record. Size limits follow schemas.topics.MAX_MESSAGE_BYTES so a 50 MB mail passes end to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.structs import OffsetAndMetadata

from schemas.topics import MAX_MESSAGE_BYTES, TopicSpec
from services.runtime.log import LogError, Outgoing, Record, TopicPartition, Written

# Room for the event framing and Kafka's record overhead on top of the largest message.
_REQUEST_BYTES = MAX_MESSAGE_BYTES + 1024 * 1024


class KafkaLogError(LogError):
    """A Kafka operation failed; `retriable` comes from aiokafka's own classification."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


def _wrap(exc: KafkaError, doing: str) -> KafkaLogError:
    return KafkaLogError(f"kafka: {doing}: {type(exc).__name__}: {exc}", retriable=bool(exc.retriable))


@dataclass
class KafkaProducer:
    """LogProducer on an idempotent aiokafka producer with acks=all."""

    producer: AIOKafkaProducer

    async def send(self, record: Outgoing) -> Written:
        return (await self.send_all([record]))[0]

    async def send_all(self, records: Sequence[Outgoing]) -> list[Written]:
        try:
            futures = [await self.producer.send(r.topic, r.value, key=r.key) for r in records]
            results = await asyncio.gather(*futures)
        except KafkaError as exc:
            raise _wrap(exc, "publish") from exc
        return [Written(m.topic, m.partition, m.offset) for m in results]


@dataclass
class KafkaConsumer:
    """LogConsumer on an aiokafka group consumer with manual commits."""

    consumer: AIOKafkaConsumer

    async def fetch(self, timeout: float, max_records: int = 500) -> list[Record]:
        try:
            batches = await self.consumer.getmany(timeout_ms=int(timeout * 1000), max_records=max_records)
        except KafkaError as exc:
            raise _wrap(exc, "fetch") from exc
        return [
            Record(m.topic, m.partition, m.offset, m.key, m.value or b"", m.timestamp)
            for messages in batches.values()
            for m in messages
        ]

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if not offsets:
            return
        try:
            await self.consumer.commit(
                {KafkaTopicPartition(tp.topic, tp.partition): OffsetAndMetadata(o, "") for tp, o in offsets.items()}
            )
        except KafkaError as exc:
            raise _wrap(exc, "commit") from exc

    async def caught_up(self) -> bool:
        assigned = self.consumer.assignment()
        if not assigned:
            return False
        ends = await self.consumer.end_offsets(list(assigned))
        for tp in assigned:
            if await self.consumer.position(tp) < ends[tp]:
                return False
        return True


@dataclass(frozen=True)
class KafkaLog:
    """The log on an Apache Kafka cluster."""

    bootstrap_servers: str
    client_id: str = "popbridge"

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> list[str]:
        async with self._admin("create topics") as admin:
            brokers = len((await admin.describe_cluster())["brokers"])
            existing = set(await admin.list_topics())
            missing = [s for s in specs if s.name not in existing]
            for spec in missing:
                await self._create(admin, spec, replication=min(3, brokers))
        return [s.name for s in missing]

    @asynccontextmanager
    async def _admin(self, doing: str) -> AsyncIterator[AIOKafkaAdminClient]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers, client_id=self.client_id)
        try:
            await admin.start()
            yield admin
        except KafkaError as exc:
            raise _wrap(exc, doing) from exc
        finally:
            await admin.close()

    async def partitions(self, topic: str) -> list[int]:
        """The partition numbers of `topic` (empty when it does not exist)."""
        async with self._admin(f"describe {topic}") as admin:
            described = await admin.describe_topics([topic])
        return sorted(p["partition"] for t in described if t["error_code"] == 0 for p in t["partitions"])

    async def end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset the next record written will get."""
        partitions = await self.partitions(topic)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap_servers, client_id=self.client_id)
        try:
            await consumer.start()
            ends = await consumer.end_offsets([KafkaTopicPartition(topic, p) for p in partitions])
        except KafkaError as exc:
            raise _wrap(exc, f"end offsets of {topic}") from exc
        finally:
            await asyncio.sleep(0)  # aiokafka's stop() right after start() re-raises a CancelledError
            await consumer.stop()
        return {tp.partition: offset for tp, offset in ends.items()}

    async def scan(self, topic: str) -> AsyncIterator[Record]:
        """Every record of `topic` from the beginning up to its end at the time of the call."""
        ends = {p: o for p, o in (await self.end_offsets(topic)).items() if o > 0}
        if not ends:
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers, client_id=self.client_id, enable_auto_commit=False,
            max_partition_fetch_bytes=_REQUEST_BYTES, fetch_max_bytes=_REQUEST_BYTES,
        )
        await consumer.start()
        try:
            consumer.assign([KafkaTopicPartition(topic, p) for p in ends])
            await consumer.seek_to_beginning()
            while ends:
                batches = await consumer.getmany(timeout_ms=1000)
                for tp, messages in batches.items():
                    for m in messages:
                        if m.offset < ends.get(tp.partition, 0):
                            yield Record(m.topic, m.partition, m.offset, m.key, m.value or b"", m.timestamp)
                for p, end in list(ends.items()):
                    if await consumer.position(KafkaTopicPartition(topic, p)) >= end:
                        del ends[p]
        except KafkaError as exc:
            raise _wrap(exc, f"read {topic}") from exc
        finally:
            await consumer.stop()

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        """Per partition, the group's committed offset (partitions without a commit are absent)."""
        async with self._admin(f"committed offsets of {group}") as admin:
            offsets = await admin.list_consumer_group_offsets(group)
        return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0}

    @staticmethod
    async def _create(admin: AIOKafkaAdminClient, spec: TopicSpec, replication: int) -> None:
        topic = NewTopic(spec.name, spec.partitions, replication, topic_configs=dict(spec.config))
        try:
            await admin.create_topics([topic])
        except TopicAlreadyExistsError:
            pass  # another replica created it between our listing and this call

    @asynccontextmanager
    async def producer(self) -> AsyncIterator[KafkaProducer]:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=self.client_id,
            acks="all",
            enable_idempotence=True,
            max_request_size=_REQUEST_BYTES,
            compression_type="zstd",
            linger_ms=5,
        )
        try:
            await producer.start()
        except KafkaError as exc:
            raise _wrap(exc, "connect producer") from exc
        try:
            yield KafkaProducer(producer)
        finally:
            await producer.stop()

    @asynccontextmanager
    async def consumer(self, group: str, topics: Sequence[str]) -> AsyncIterator[KafkaConsumer]:
        consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=self.bootstrap_servers,
            client_id=self.client_id,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=_REQUEST_BYTES,
            fetch_max_bytes=_REQUEST_BYTES,
            isolation_level="read_committed",
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            raise _wrap(exc, "connect consumer") from exc
        try:
            yield KafkaConsumer(consumer)
        finally:
            await consumer.stop()
