"""The faust router on the real broker: copies of one message on different partitions meet by
Message-ID, with several partitions and two router processes sharing them."""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import pytest

from schemas import codec
from schemas.events import MailFetched, RecipientsResolved, fetch_id_for
from schemas.topics import FETCHED, ROUTED, TOPICS, TopicSpec
from services.runtime.kafka import KafkaLog
from services.runtime.log import Outgoing
from services.runtime.settings import DeploymentSettings
from tests.support.mail_config import mail_config_text

pytestmark = pytest.mark.integration

CONFIG = mail_config_text(
    delivery={"host": "127.0.0.1", "tls": "none"},
    routing={"primary_domain": "example.com", "local_domains": ["example.com"],
             "users": ["alice", "bob", "carol", "dave", "postmaster"],
             "postmaster": "postmaster@example.com",
             "trusted_received_hosts": ["mx.isp.example.net"]},
    mailboxes=[{"id": "catchall", "host": "pop.isp.example.net", "username": "mbox4711",
                "password_env": "UNUSED_IN_THIS_TEST"}],
)  # fmt: skip


def copy(message_id: str | None, *, delivered_to: str | None, body: str = "hello") -> bytes:
    top = f"Delivered-To: {delivered_to}\r\n" if delivered_to else ""
    hop = (
        "Received: from out.example by mx.isp.example.net with ESMTP id 7;\r\n"
        "\tFri, 27 Nov 2026 08:00:00 +0000\r\n"
    )
    mid = f"Message-ID: <{message_id}>\r\n" if message_id else ""
    return (
        f"{top}{hop}{mid}From: someone@outside.example\r\nTo: alice@example.com, bob@example.com\r\n"
        f"Subject: copies\r\n\r\n{body}\r\n"
    ).encode()


def fetched(uidl: str, raw: bytes) -> MailFetched:
    return MailFetched(
        fetch_id=fetch_id_for("catchall", uidl),
        mailbox_id="catchall",
        pop3_host="pop.isp.example.net",
        uidl=uidl,
        size=len(raw),
        sha256="",
        fetched_at=datetime.now(UTC),
        raw=raw,
    )


async def start_router_process(
    config: Path, settings: DeploymentSettings, *options: str, output: IO[bytes] | None = None
) -> asyncio.subprocess.Process:
    """`popbridge router --config CONFIG OPTIONS...` as its own OS process, as an operator runs it;
    its stdout and stderr go to `output` when given."""
    env = {
        **os.environ,
        "POPBRIDGE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap or "",
        "POPBRIDGE_TOPIC_PREFIX": settings.topic_prefix,
        "POPBRIDGE_GROUP_PREFIX": settings.group_prefix,
    }
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "router", "--config", str(config), *options, env=env,
        stdout=output, stderr=output,
    )


async def run_router_process(config: Path, settings: DeploymentSettings) -> int:
    process = await start_router_process(config, settings, "--until-idle")
    return await asyncio.wait_for(process.wait(), timeout=180)


async def test_each_recipient_gets_one_copy_across_partitions_and_router_instances(
    kafka_bootstrap: str, kafka_topic_prefix: str, tmp_path: Path
) -> None:
    settings = DeploymentSettings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=kafka_topic_prefix,
        group_prefix=kafka_topic_prefix + "g",
    )
    log = KafkaLog(kafka_bootstrap)
    await log.ensure_topics([TopicSpec(settings.topic(s.name), s.partitions, s.config) for s in TOPICS])
    config = tmp_path / "popbridge.toml"
    config.write_text(CONFIG)
    copies = {
        # The ISP's per-recipient Bcc copies: each goes to its own recipient.
        "bcc-a": copy("bcc@x", delivered_to="carol@example.com"),
        "bcc-b": copy("bcc@x", delivered_to="dave@example.com"),
        # Copies without envelope data fall back to To/Cc: alice and bob once, not three times.
        "cc-1": copy("cc@x", delivered_to=None),
        "cc-2": copy("cc@x", delivered_to=None),
        "cc-3": copy("cc@x", delivered_to=None),
        # Same Message-ID, different body: real mail, not a duplicate.
        "other-body": copy("cc@x", delivered_to=None, body="a different text"),
        # No Message-ID: never deduplicated.
        "no-id-1": copy(None, delivered_to="carol@example.com"),
        "no-id-2": copy(None, delivered_to="carol@example.com"),
    }
    events = [fetched(uidl, raw) for uidl, raw in copies.items()]
    async with log.producer() as producer:
        written = await producer.send_all(
            [Outgoing(settings.topic(FETCHED), codec.encode(e), e.fetch_id.encode()) for e in events]
        )
    assert len({w.partition for w in written}) > 1  # the copies really are spread over partitions

    results = await asyncio.gather(run_router_process(config, settings), run_router_process(config, settings))

    assert list(results) == [0, 0]
    routed = [codec.decode(r.value, RecipientsResolved) async for r in log.scan(settings.topic(ROUTED))]
    by_uidl = {uidl: [e for e in routed if e.fetch_id == fetch_id_for("catchall", uidl)] for uidl in copies}
    assert all(len(found) >= 1 for found in by_uidl.values())  # every copy was routed (maybe twice)
    latest = {uidl: found[-1] for uidl, found in by_uidl.items()}

    def delivered(uidls: list[str]) -> Counter[str]:
        return Counter(r.address for u in uidls for r in latest[u].recipients)

    assert delivered(["bcc-a", "bcc-b"]) == {"carol@example.com": 1, "dave@example.com": 1}
    assert delivered(["cc-1", "cc-2", "cc-3"]) == {"alice@example.com": 1, "bob@example.com": 1}
    assert sum(len(latest[u].suppressed) for u in ["cc-1", "cc-2", "cc-3"]) == 4
    assert delivered(["other-body"]) == {"alice@example.com": 1, "bob@example.com": 1}
    assert delivered(["no-id-1", "no-id-2"]) == {"carol@example.com": 2}
