"""`popbridge topics create` on the real broker, and a 25 MB mail through the topics it creates."""

from __future__ import annotations

import asyncio
import hashlib
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


async def create_topics(bootstrap: str, prefix: str) -> str:
    """Run the command as an operator would (in a thread: the command runs its own event loop)."""
    return await asyncio.to_thread(_create_topics, bootstrap, prefix)


def _create_topics(bootstrap: str, prefix: str) -> str:
    env = {
        **os.environ,
        "POPBRIDGE_KAFKA_BOOTSTRAP": bootstrap,
        "POPBRIDGE_TOPIC_PREFIX": prefix,
        "POPBRIDGE_GROUP_PREFIX": prefix,  # the router's internal topics are named after its group
    }
    result = CliRunner().invoke(cli, ["topics", "create"], env=env)
    assert result.exit_code == 0, result.output
    return result.output


async def test_topics_create_applies_every_partition_count_and_setting(
    kafka_bootstrap: str, kafka_topic_prefix: str
) -> None:
    first = await create_topics(kafka_bootstrap, kafka_topic_prefix)
    again = await create_topics(kafka_bootstrap, kafka_topic_prefix)

    settings = DeploymentSettings(topic_prefix=kafka_topic_prefix, group_prefix=kafka_topic_prefix)
    specs = [TopicSpec(kafka_topic_prefix + s.name, s.partitions, s.config) for s in TOPICS]
    specs += router_internal_topics(settings)  # the faust router's, before any router starts
    assert first.count("created ") == len(specs)
    assert again.count("exists ") == len(specs)
    log = KafkaLog(kafka_bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        for spec in specs:
            name = spec.name
            assert len(await log.partitions(name)) == spec.partitions, name
            described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
            actual = {entry[0]: entry[1] for entry in described[0].resources[0][4]}
            assert {k: actual[k] for k in spec.config} == spec.config, name
    finally:
        await admin.close()


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
