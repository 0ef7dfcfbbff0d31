"""`popbridge topics create` on the real broker, and a 25 MB mail through the topics it creates."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from datetime import UTC, datetime

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from click.testing import CliRunner

from schemas import codec
from schemas.events import MailFetched, fetch_id_for
from schemas.topics import FETCHED, TOPICS, TopicSpec
from services.cli import cli
from services.runtime.kafka import KafkaLog
from services.runtime.log import Outgoing
from services.runtime.settings import DeploymentSettings
from services.runtime.stages import router_internal_topics

pytestmark = pytest.mark.integration


async def create_topics(bootstrap: str, prefix: str, *flags: str) -> str:
    """Run the command as an operator would (in a thread: the command runs its own event loop)."""
    return await asyncio.to_thread(_create_topics, bootstrap, prefix, *flags)


def _create_topics(bootstrap: str, prefix: str, *flags: str) -> str:
    env = {
        **os.environ,
        "POPBRIDGE_KAFKA_BOOTSTRAP": bootstrap,
        "POPBRIDGE_TOPIC_PREFIX": prefix,
        "POPBRIDGE_GROUP_PREFIX": prefix,  # the router's internal topics are named after its group
    }
    result = CliRunner().invoke(cli, ["topics", "create", *flags], env=env)
    assert result.exit_code == 0, result.output
    return result.output


async def described_partitions(log: KafkaLog, topic: str) -> list[int]:
    """The partitions of a topic created a moment ago: the broker describes it only once its partitions
    have leaders (LEADER_NOT_AVAILABLE until then), which Kafka announces to no one, so ask again."""
    for _ in range(100):
        if found := await log.partitions(topic):
            return found
        await asyncio.sleep(0.1)
    return []


async def test_topics_create_applies_every_partition_count_and_setting(
    kafka_bootstrap: str, kafka_topic_prefix: str
) -> None:
    planned = json.loads(await create_topics(kafka_bootstrap, kafka_topic_prefix, "--dry-run", "--json"))
    first = await create_topics(kafka_bootstrap, kafka_topic_prefix)
    again = await create_topics(kafka_bootstrap, kafka_topic_prefix)

    settings = DeploymentSettings(topic_prefix=kafka_topic_prefix, group_prefix=kafka_topic_prefix)
    specs = [TopicSpec(kafka_topic_prefix + s.name, s.partitions, s.config) for s in TOPICS]
    specs += router_internal_topics(settings)  # the faust router's, before any router starts
    assert [t["action"] for t in planned["topics"]] == ["create"] * len(specs)  # and nothing was created:
    assert first.count("created ") == len(specs)
    assert again.count("exists ") == len(specs)
    log = KafkaLog(kafka_bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        for spec in specs:
            name = spec.name
            assert len(await described_partitions(log, name)) == spec.partitions, name
            described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
            actual = {entry[0]: entry[1] for entry in described[0].resources[0][4]}
            assert {k: actual[k] for k in spec.config} == spec.config, name
    finally:
        await admin.close()
    # Planned again once every topic is described (a topic created a moment ago may not be yet).
    replanned = json.loads(await create_topics(kafka_bootstrap, kafka_topic_prefix, "--dry-run", "--json"))
    assert {t["name"]: (t["action"], t["found_partitions"]) for t in replanned["topics"]} == {
        spec.name: ("exists", spec.partitions) for spec in specs}


async def test_a_25_mb_mail_passes_through_the_fetched_topic(
    kafka_bootstrap: str, kafka_topic_prefix: str
) -> None:
    await create_topics(kafka_bootstrap, kafka_topic_prefix)
    raw = b"Subject: big\r\n\r\n" + os.urandom(25 * 1024 * 1024)
    event = MailFetched(
        fetch_id=fetch_id_for("mb", "big"),
        mailbox_id="mb",
        pop3_host="pop",
        uidl="big",
        size=len(raw),
        sha256=hashlib.sha256(raw).hexdigest(),
        fetched_at=datetime.now(UTC),
        raw=raw,
    )
    log = KafkaLog(kafka_bootstrap)
    topic = kafka_topic_prefix + FETCHED
    async with log.producer() as producer:
        await producer.send(Outgoing(topic, codec.encode(event), event.fetch_id.encode()))

    async with log.consumer(kafka_topic_prefix + "g-big", [topic]) as consumer:
        records = []
        for _ in range(60):
            records += await consumer.fetch(timeout=1.0)
            if records:
                break
    assert len(records) == 1
    received = codec.decode(records[0].value, MailFetched)
    assert hashlib.sha256(received.raw).hexdigest() == event.sha256


async def test_mail_larger_than_the_prefetch_is_read_among_small_mail_on_every_partition(
    kafka_bootstrap: str, kafka_topic_prefix: str
) -> None:
    """A group consumer fetches 1 MiB a partition ahead; a 6 MB record on a partition that is not the first
    of a fetch response still comes (the broker answers that partition again), in order, none skipped."""
    log = KafkaLog(kafka_bootstrap)
    topic = kafka_topic_prefix + "prefetch"
    partitions = 6
    await log.ensure_topics([TopicSpec(topic, partitions)])
    sent: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
    async with log.producer() as producer:
        for i in range(10):
            for p in range(partitions):
                size = 6 * 1024 * 1024 if (i, p) in {(2, 1), (5, 3), (5, 4), (9, 5)} else 20_000
                value = b"%d-%d:" % (p, i) + os.urandom(size)
                sent[p].append(value)
                await producer.send(Outgoing(topic, value, None, p))
    received: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
    async with log.consumer(kafka_topic_prefix + "g-prefetch", [topic]) as consumer:
        for _ in range(120):
            for record in await consumer.fetch(timeout=1.0):
                received[record.partition].append(record.value)
            if sum(map(len, received.values())) >= 10 * partitions:
                break
    assert {p: [hashlib.sha256(v).digest() for v in values] for p, values in received.items()} == {
        p: [hashlib.sha256(v).digest() for v in values] for p, values in sent.items()}
