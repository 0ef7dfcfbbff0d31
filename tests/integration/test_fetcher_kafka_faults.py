"""The fetcher and the broker: started before it, the fetcher waits, then works (issue 13)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from schemas.topics import TOPICS, TopicSpec
from services.runtime.kafka import KafkaLog
from tests.support.kafka import start_local_broker, stop_local_broker
from tests.support.mail_config import delivery_to, mailbox, write_mail_config

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
    environ = {
        **os.environ, "POPBRIDGE_KAFKA_BOOTSTRAP": bootstrap, "POPBRIDGE_TOPIC_PREFIX": kafka_topic_prefix,
        "POPBRIDGE_GROUP_PREFIX": kafka_topic_prefix + "g", "POPBRIDGE_LOG_FORMAT": "text",
        "POP3_PASSWORD": "pw",
    }  # fmt: skip
    stage = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "fetcher", "--config", str(config),
        env=environ, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert stage.stderr is not None
    lines = []
    try:
        lines.append((await asyncio.wait_for(stage.stderr.readline(), 60)).decode())
        assert "Unable connect to" in lines[0]  # one line for the first failure; then it waits
        restarted, problem = await asyncio.to_thread(start_local_broker, directory)
        assert restarted == bootstrap, problem
        while "polling 1 of 1 mailboxes" not in lines[-1]:  # it joined the fetcher group: working
            line = (await asyncio.wait_for(stage.stderr.readline(), 60)).decode()
            assert line, f"the fetcher exited: {''.join(lines)}"
            lines.append(line)
        assert stage.returncode is None
    finally:
        if stage.returncode is None:
            stage.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(stage.communicate(), 60))[1].decode()
    assert stage.returncode == 0, rest
    assert "Traceback" not in "".join(lines) + rest
