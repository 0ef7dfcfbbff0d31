"""The session's Kafka broker carries records and 25 MB mails, and the local broker script reuses its jars."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support.kafka import BROKER_SCRIPT, MAX_MESSAGE_BYTES, no_kafka

pytestmark = pytest.mark.integration

MAIL_BYTES = 25 * 1024 * 1024


async def create_topic(bootstrap: str, topic: str, configs: dict[str, str] | None = None) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=1, replication_factor=1, topic_configs=configs or {})]
        )
    finally:
        await admin.close()


async def test_a_record_sent_with_acks_all_reaches_a_consumer_group(
    kafka_bootstrap: str, kafka_topic_prefix: str
) -> None:
    topic, group = f"{kafka_topic_prefix}mail", f"{kafka_topic_prefix}group"
    await create_topic(kafka_bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"Subject: hello\r\n\r\nhi\r\n", key=b"uidl-1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=60)
        await consumer.commit()
        committed = await consumer.committed(TopicPartition(topic, 0))
    finally:
        await consumer.stop()
    assert (record.key, record.value) == (b"uidl-1", b"Subject: hello\r\n\r\nhi\r\n")
    assert committed == record.offset + 1


async def test_a_25_mb_mail_passes_through_a_topic_that_allows_64_mib(
    kafka_bootstrap: str, kafka_topic_prefix: str
) -> None:
    topic = f"{kafka_topic_prefix}large"
    await create_topic(kafka_bootstrap, topic, {"max.message.bytes": str(MAX_MESSAGE_BYTES)})
    mail = os.urandom(MAIL_BYTES)  # random, so compression cannot shrink it under the default limits
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        max_request_size=MAX_MESSAGE_BYTES,
        request_timeout_ms=120_000,
    )
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, mail)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
        fetch_max_bytes=MAX_MESSAGE_BYTES,
    )
    await consumer.start()
    try:
        partition = TopicPartition(topic, sent.partition)
        consumer.assign([partition])
        consumer.seek(partition, sent.offset)
        record = await asyncio.wait_for(consumer.getone(), timeout=120)
    finally:
        await consumer.stop()
    assert len(record.value) == MAIL_BYTES
    assert hashlib.sha256(record.value).hexdigest() == hashlib.sha256(mail).hexdigest()


def broker_script(*arguments: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ) if path is None else {**os.environ, "PATH": path}
    return subprocess.run(
        [sys.executable, str(BROKER_SCRIPT), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
        check=False,
    )


def test_a_start_with_a_complete_jar_cache_does_not_run_mvn(tmp_path: Path) -> None:
    if shutil.which("java") is None:
        no_kafka("no java on PATH: the local Kafka broker cannot run")
    fetched = broker_script("fetch")  # makes the cache complete; a no-op when the session broker did it
    assert fetched.returncode == 0, fetched.stderr
    spy = tmp_path / "bin"
    spy.mkdir()
    (spy / "mvn").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "mvn-ran"}\nexit 1\n')
    (spy / "mvn").chmod(0o755)
    directory = tmp_path / "broker"
    started = broker_script("start", "--dir", str(directory), path=f"{spy}{os.pathsep}{os.environ['PATH']}")
    try:
        assert started.returncode == 0, started.stderr
        assert not (tmp_path / "mvn-ran").exists()
        assert "mvn not run" in started.stderr
        bootstrap = started.stdout.splitlines()[-1]
        assert broker_script("status", "--dir", str(directory)).stdout.strip() == bootstrap
        again = broker_script("start", "--dir", str(directory))
        assert (again.returncode, again.stdout.splitlines()[-1:]) == (0, [bootstrap])
        assert "already running" in again.stderr
    finally:
        stopped = broker_script("stop", "--dir", str(directory))
    assert stopped.returncode == 0, stopped.stderr
    assert broker_script("status", "--dir", str(directory)).returncode == 3
