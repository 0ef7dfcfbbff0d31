"""The deliverer group after a broker restart, on a real broker: the shape of the chaos runs where the first
delivery came 33-57 s after the broker was back (seeds 12 and 14 on the single `deliverer` group).

One replica is in the middle of a batch when the broker stops (its SMTP transaction ends while the broker
is away, so its outcomes wait to be published) and a second replica starts during the outage, so the group
has to rebalance, with that batch in hand, right after the broker returns. Every copy must arrive once; the
time from the broker being ready to the last new copy is printed (figures, not assertions)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.deliverer.service import Counts, Deliverer
from services.deliverer.smtp import SmtpTransport
from services.runtime.kafka import KafkaLog
from services.runtime.settings import DeploymentSettings
from tests.support.deliverer import deployment, publish, routed_event, smtp_target
from tests.support.kafka import start_local_broker, stop_local_broker
from tests.support.smtp import ReceivedMessage, SmtpSink

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE = 15.0  # seconds the broker stays away: longer than the session timeout (10 s)


class Gate:
    """Holds every SMTP DATA until opened; `reached` is set by the first one."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.open = threading.Event()

    def __call__(self, _: ReceivedMessage) -> None:
        self.reached.set()
        self.open.wait(120)


@asynccontextmanager
async def running(
    log: KafkaLog, settings: DeploymentSettings, port: int
) -> AsyncIterator[asyncio.Task[Counts]]:
    stop = asyncio.Event()
    async with SmtpTransport(smtp_target(port, timeout=90.0)) as transport:
        stage = Deliverer(log, settings, transport, poll_seconds=0.2)
        task = asyncio.create_task(stage.run(stop=stop))
        try:
            yield task
        finally:
            stop.set()
            await asyncio.wait({task}, timeout=60)


def _wait_for_copies(sink: SmtpSink, recipient: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sum(recipient in m.rcpt_tos for m in sink.messages) < count:
        assert time.monotonic() < deadline, f"{recipient}: not {count} copies within {timeout:.0f} s"
        time.sleep(0.05)


async def test_the_group_delivers_again_after_a_broker_restart_with_a_batch_in_hand_and_a_replica_joining(
    own_broker: tuple[str, Path], kafka_topic_prefix: str, smtp_sink: SmtpSink
) -> None:
    bootstrap, directory = own_broker
    settings, log = await deployment(bootstrap, kafka_topic_prefix)
    gate = Gate()
    smtp_sink.data_reply = gate
    before = [routed_event(f"b{i}", ["alice@example.com"], routed_at=datetime.now(UTC)) for i in range(12)]
    after = [routed_event(f"a{i}", ["bob@example.com"], routed_at=datetime.now(UTC)) for i in range(12)]
    async with running(log, settings, smtp_sink.port) as first:
        await publish(log, settings, *before)
        assert await asyncio.to_thread(gate.reached.wait, 60)  # a batch is in SMTP
        await asyncio.to_thread(stop_local_broker, directory)
        gate.open.set()  # its copies are accepted while the broker is away: their outcomes wait
        async with running(log, settings, smtp_sink.port) as second:  # joins once the broker is back
            await asyncio.sleep(OUTAGE)
            restarted, problem = await asyncio.to_thread(start_local_broker, directory)
            assert restarted == bootstrap, problem
            back = time.monotonic()
            await publish(log, settings, *after)
            await asyncio.to_thread(_wait_for_copies, smtp_sink, "bob@example.com", len(after), 150)
            took = time.monotonic() - back
            print(f"all {len(after)} new copies delivered {took:.1f} s after the broker was ready again")
            await asyncio.to_thread(_wait_for_copies, smtp_sink, "alice@example.com", len(before), 150)
            assert not first.done()
            assert not second.done()
    assert first.exception() is None
    assert second.exception() is None
    delivered = Counter(r for m in smtp_sink.messages for r in m.rcpt_tos)
    assert delivered == Counter({"alice@example.com": len(before), "bob@example.com": len(after)})
