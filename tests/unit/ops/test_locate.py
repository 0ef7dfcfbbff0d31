"""services/ops/locate.py: which partition a key lives on, which offsets a window covers (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from schemas.events import fetch_id_for
from services.ops.locate import (
    CHUNK,
    MAX_CHUNK,
    KeyRead,
    Window,
    kafka_partition,
    key_reads,
    murmur2,
    next_chunk,
    parse_since,
)
from services.runtime.embedded.records import partition_for_key

NOW = datetime(2026, 12, 7, 12, tzinfo=UTC)
KEYS = [b"", b"a", b"ab", b"abc", b"abcd", "zwölf@例え.jp".encode(), *(fetch_id_for("mb", f"u{i}").encode()
                                                                    for i in range(200))]


@pytest.mark.parametrize("key", KEYS)
def test_murmur2_is_the_kafka_clients_hash(key: bytes) -> None:
    assert murmur2(key) == aiokafka_murmur2(key)


@pytest.mark.parametrize("partitions", [1, 3, 6, 64])
def test_the_partition_of_a_key_is_the_one_aiokafkas_producer_picks(partitions: int) -> None:
    every = list(range(partitions))
    assert [kafka_partition(k, partitions) for k in KEYS] == [
        DefaultPartitioner()(k, every, every) for k in KEYS
    ]


def test_a_read_per_topic_on_the_partition_of_the_key_with_the_logs_partitioner() -> None:
    window = Window(1000, None)
    key = fetch_id_for("catchall", "u1").encode()
    reads = key_reads(key, {"fetched": 6, "dead": 3, "not-created": 0}, kafka_partition, window)
    assert reads == [KeyRead("fetched", kafka_partition(key, 6), key, window),
                     KeyRead("dead", kafka_partition(key, 3), key, window)]
    embedded = key_reads(key, {"fetched": 6}, partition_for_key, window)
    assert embedded[0].partition == partition_for_key(key, 6)


def test_reads_grow_while_their_records_are_small_and_shrink_when_large() -> None:
    assert next_chunk(CHUNK, 1000, budget=16_000) == 4 * CHUNK
    assert next_chunk(MAX_CHUNK, 0) == MAX_CHUNK
    assert next_chunk(4000, 10_000, budget=16_000) == 4000  # between a quarter and the budget: kept
    assert next_chunk(4000, 16_001, budget=16_000) == 2000
    assert next_chunk(CHUNK, 10**9) == CHUNK


def test_the_events_after_a_fetch_are_read_from_the_fetch_less_the_clock_skew_to_the_horizon() -> None:
    fetched, appended = 10_000_000, 10_000_500
    skew, horizon = timedelta(minutes=1), timedelta(hours=1)
    expected = Window(fetched - 60_000, appended + 3_600_000)
    assert Window().anchored(fetched, appended, skew, horizon) == expected
    # a fetcher clock ahead of the broker: the append time bounds the start
    assert Window().anchored(appended, fetched, skew, horizon) == expected
    # a copy replayed a day later: its own events are followed too
    replayed = fetched + 86_400_000
    assert Window().anchored(fetched, replayed, skew, horizon).until_ms == replayed + 3_600_000
    # a --since later than the anchor still bounds the read; --until replaces the horizon
    bounded = Window(fetched, 20_000_000)
    assert bounded.anchored(fetched, fetched, skew, horizon) == bounded


@pytest.mark.parametrize(("text", "expected"), [
    ("30m", NOW - timedelta(minutes=30)), ("12h", NOW - timedelta(hours=12)), ("7d", NOW - timedelta(days=7)),
    ("2w", NOW - timedelta(weeks=2)), ("2026-12-01T08:00", datetime(2026, 12, 1, 8, tzinfo=UTC)),
    ("2026-12-01T08:00+01:00", datetime(2026, 12, 1, 7, tzinfo=UTC)),
])
def test_since_is_a_duration_back_or_a_time(text: str, expected: datetime) -> None:
    assert parse_since(text, NOW) == expected


def test_a_since_that_is_neither_says_what_is_accepted() -> None:
    with pytest.raises(ValueError, match=r"not a duration \(30m, 12h, 7d, 2w\) or an ISO 8601 time: '7 d"):
        parse_since("7 days", NOW)
