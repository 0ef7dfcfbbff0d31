"""services/runtime/embedded/retention.py: compaction and retention."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.topics import TopicSpec
from services.runtime.embedded import EmbeddedLog, EmbeddedLogError
from services.runtime.log import Outgoing
from tests.support.embedded_log import TOPIC, FakeClock, keyed, new_log, produce, read, values


async def test_compaction_keeps_the_latest_record_of_each_key(tmp_path: Path) -> None:
    log = await new_log(tmp_path, partitions=2, config={"cleanup.policy": "compact"})
    await produce(
        log, [Outgoing(TOPIC, b"%s-v%d" % (k, v), key=k) for v in range(3) for k in (b"a", b"b", b"c")]
    )
    ends = await log.end_offsets(TOPIC)
    assert await log.clean_up() == {TOPIC: 6}
    assert await log.end_offsets(TOPIC) == ends  # offsets are never reused
    async with log.consumer("g", [TOPIC]) as consumer:
        assert sorted(values(await read(consumer, 3))) == [b"a-v2", b"b-v2", b"c-v2"]
        assert await consumer.caught_up()
    async with log.producer() as producer:
        with pytest.raises(EmbeddedLogError, match="needs a key"):
            await producer.send(Outgoing(TOPIC, b"no key"))


async def test_retention_deletes_records_older_than_retention_ms(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    log = EmbeddedLog(tmp_path, clock=clock)
    await log.ensure_topics([TopicSpec(TOPIC, 1, {"retention.ms": "60000"})])
    await produce(log, keyed(3))
    clock.now += 120
    await produce(log, keyed(2, start=3))
    assert await log.expire(TOPIC) == 3
    assert await log.start_offsets(TOPIC) == {0: 3}
    async with log.consumer("g", [TOPIC]) as consumer:
        assert values(await read(consumer, 2)) == [b"value-3", b"value-4"]


# Errors and limits.
