"""The deliverer group after a broker restart, on a real broker: the shape of the chaos runs where the first
delivery came 33-57 s after the broker was back (seeds 12 and 14 on the single `deliverer` group).

One replica is in the middle of a batch when the broker stops (its SMTP transaction ends while the broker
is away, so its outcomes wait to be published) and a second replica starts during the outage, so the group
has to rebalance, with that batch in hand, right after the broker returns. Every copy must arrive once; the
time from the broker being ready to the last new copy is printed (figures, not assertions)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.deliverer import deployment, publish, routed_event, running_deliverer
from tests.support.kafka import start_local_broker, stop_local_broker
from tests.support.smtp import DataGate, SmtpSink

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE = 15.0  # seconds the broker stays away: longer than the session timeout (10 s)


async def test_the_group_delivers_again_after_a_broker_restart_with_a_batch_in_hand_and_a_replica_joining(
    own_broker: tuple[str, Path], kafka_topic_prefix: str, smtp_sink: SmtpSink
) -> None:
    bootstrap, directory = own_broker
    settings, log = await deployment(bootstrap, kafka_topic_prefix)
    gate = DataGate()
    smtp_sink.data_reply = gate
    before = [routed_event(f"b{i}", ["alice@example.com"], routed_at=datetime.now(UTC)) for i in range(12)]
    after = [routed_event(f"a{i}", ["bob@example.com"], routed_at=datetime.now(UTC)) for i in range(12)]
    async with running_deliverer(log, settings, smtp_sink.port) as first:
        await publish(log, settings, *before)
        assert await asyncio.to_thread(gate.reached.wait, 60)  # a batch is in SMTP
        await asyncio.to_thread(stop_local_broker, directory)
        gate.open.set()  # its copies are accepted while the broker is away: their outcomes wait
        async with running_deliverer(log, settings, smtp_sink.port) as second:  # joins after the outage
            await asyncio.sleep(OUTAGE)
            restarted, problem = await asyncio.to_thread(start_local_broker, directory)
            assert restarted == bootstrap, problem
            back = time.monotonic()
            await publish(log, settings, *after)
            await asyncio.to_thread(smtp_sink.wait_for, len(after), 150, recipient="bob@example.com")
            took = time.monotonic() - back
            print(f"all {len(after)} new copies delivered {took:.1f} s after the broker was ready again")
            await asyncio.to_thread(smtp_sink.wait_for, len(before), 150, recipient="alice@example.com")
            assert not first.done()
            assert not second.done()
    assert first.exception() is None
    assert second.exception() is None
    delivered = Counter(r for m in smtp_sink.messages for r in m.rcpt_tos)
    assert delivered == Counter({"alice@example.com": len(before), "bob@example.com": len(after)})
