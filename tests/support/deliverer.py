"""Helpers for the deliverer tests: a clock that moves only when told, routed events, topics on the broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from schemas.codec import decode, encode
from schemas.events import Recipient, RecipientsResolved, fetch_id_for
from schemas.topics import ROUTED, TOPICS, TopicSpec
from services.deliverer.ledger import read_to_end
from services.deliverer.retry import RetryPolicy
from services.deliverer.service import Counts, Deliverer
from services.deliverer.smtp import SmtpTransport
from services.runtime.kafka import KafkaLog
from services.runtime.log import Log, Outgoing
from services.runtime.settings import DeploymentSettings, SmtpTarget

T = TypeVar("T")
START = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
MESSAGE = (
    b"From: Bob <bob@remote.example>\r\nTo: alice@example.com\r\nSubject: hello\r\n"
    b"Message-ID: <m1@remote.example>\r\n\r\nHello Alice,\r\n.a line with a leading dot\r\nBob\r\n"
)


class FakeClock:
    """Time that moves only by `advance` or `sleep` (which returns at once): no test waits real minutes."""

    def __init__(self, start: datetime = START) -> None:
        self.time = start

    def now(self) -> datetime:
        return self.time

    def advance(self, seconds: float) -> None:
        self.time += timedelta(seconds=seconds)

    async def sleep(self, seconds: float) -> None:
        self.advance(seconds)
        await asyncio.sleep(0)


def routed_event(
    uidl: str = "uidl-1",
    recipients: Sequence[str] = ("alice@example.com",),
    *,
    raw: bytes = MESSAGE,
    sender: str | None = "bob@remote.example",
    routed_at: datetime = START,
) -> RecipientsResolved:
    return RecipientsResolved(
        fetch_id=fetch_id_for("catchall", uidl),
        mailbox_id="catchall",
        pop3_host="pop.isp.example",
        message_id="<m1@remote.example>",
        envelope_sender=sender,
        recipients=tuple(Recipient(address=a, reason="test") for a in recipients),
        reason="test",
        rules_version="v1",
        routed_at=routed_at,
        raw=raw,
    )


async def deployment(bootstrap: str, prefix: str) -> tuple[DeploymentSettings, KafkaLog]:
    """Settings whose topics and groups carry `prefix`, with every topic created."""
    log = KafkaLog(bootstrap)
    await log.ensure_topics([TopicSpec(prefix + spec.name, spec.partitions, spec.config) for spec in TOPICS])
    return DeploymentSettings(kafka_bootstrap=bootstrap, topic_prefix=prefix, group_prefix=prefix + "g"), log


async def publish(log: Log, settings: DeploymentSettings, *events: RecipientsResolved) -> None:
    topic = settings.topic(ROUTED)
    async with log.producer() as producer:
        await producer.send_all([Outgoing(topic, encode(e), e.fetch_id.encode()) for e in events])


async def read_events(log: Log, settings: DeploymentSettings, topic: str, cls: type[T]) -> list[T]:
    """Every event on one of the test's topics (its whole history is this test's), in write order."""
    async with log.consumer(
        settings.group(f"reader-{asyncio.get_running_loop().time()}"), [settings.topic(topic)]
    ) as consumer:
        records = await read_to_end(consumer, poll_seconds=0.2)
    return [decode(r.value, cls) for r in sorted(records, key=lambda r: (r.timestamp_ms, r.offset))]


def smtp_target(port: int, **changes: object) -> SmtpTarget:
    fields: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "tls": "none",
        "timeout": 2.0,
        "helo_name": "deliverer.test",
    }
    return SmtpTarget(**{**fields, **changes})  # type: ignore[arg-type]  # keyword fields of SmtpTarget


async def deliver_until_idle(
    log: Log,
    settings: DeploymentSettings,
    target: SmtpTarget,
    clock: FakeClock,
    policy: RetryPolicy | None = None,
) -> Counts:
    async with SmtpTransport(target) as transport:
        stage = Deliverer(
            log, settings, transport, clock=clock, policy=policy or RetryPolicy(), poll_seconds=0.2
        )
        return await stage.run(until_idle=True)


@asynccontextmanager
async def running_deliverer(
    log: KafkaLog, settings: DeploymentSettings, port: int, policy: RetryPolicy | None = None
) -> AsyncIterator[asyncio.Task[Counts]]:
    """A deliverer (SMTP to `port`) running until the block ends; the task is handed out to check it did
    not crash. At the end it is stopped and given 60 s to finish its batch."""
    stop = asyncio.Event()
    async with SmtpTransport(smtp_target(port, timeout=90.0)) as transport:
        stage = Deliverer(log, settings, transport, poll_seconds=0.2, policy=policy or RetryPolicy())
        task = asyncio.create_task(stage.run(stop=stop))
        try:
            yield task
        finally:
            stop.set()
            await asyncio.wait({task}, timeout=60)
