"""The fetcher and the broker: started before it, the fetcher waits, then works (issue 13)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from schemas.topics import TOPICS, TopicSpec
from services.runtime.kafka import KafkaLog
from services.runtime.settings import DeploymentSettings
from tests.support.kafka import start_local_broker, stop_local_broker
from tests.support.mail_config import delivery_to, mailbox, write_mail_config
from tests.support.stages import stage_environ, stage_process

pytestmark = pytest.mark.integration

# A mailbox on a port nobody listens on: its passes fail (unreachable), which the fetcher lives with.
UNREACHABLE_MAILBOX = mailbox("alice", "127.0.0.1", 9, "alice")


async def test_a_fetcher_started_before_the_broker_waits_for_it_then_polls(
    own_broker: tuple[str, Path], kafka_topic_prefix: str, tmp_path: Path
) -> None:
    # Seen in the chaos runs: started while the broker was down, the fetcher exited with a 73-line traceback.
    bootstrap, directory = own_broker
    log = KafkaLog(bootstrap)
    await log.ensure_topics([TopicSpec(kafka_topic_prefix + s.name, s.partitions, s.config) for s in TOPICS])
    await asyncio.to_thread(stop_local_broker, directory)
    config = write_mail_config(tmp_path / "mail.toml", delivery=delivery_to(25),
                               mailboxes=[UNREACHABLE_MAILBOX])
    settings = DeploymentSettings(topic_prefix=kafka_topic_prefix, group_prefix=kafka_topic_prefix + "g")
    environ = stage_environ(bootstrap, settings, POP3_PASSWORD="pw")
    async with stage_process("fetcher", config, environ) as stage:
        line = await stage.next_line()
        assert "Unable connect to" in line  # one line for the first failure; then it waits
        restarted, problem = await asyncio.to_thread(start_local_broker, directory)
        assert restarted == bootstrap, problem
        while "polling 1 of 1 mailboxes" not in line:  # it joined the fetcher group: working
            line = await stage.next_line()
            assert line, f"the fetcher exited: {''.join(stage.lines)}"
