"""Where the records about one key are, without reading whole topics (pure: keys, counts, times in).

Every event about a message is keyed by its fetch id (fetched, routed, attempts, retry tiers, dead letters;
the delivered ledger by fetch id + recipient), so all of them sit on one partition per topic: the one
the producer's partitioner picks. Kafka's clients pick it with murmur2 of the key bytes modulo the
partition count (the Java client's and aiokafka's DefaultPartitioner; `kafka_partition` is the same
function, a unit test holds the two equal); the embedded log picks crc32 (services.runtime.embedded
.records), so a plan takes the log's partitioner as an argument.

A fetch id is a digest of (mailbox, UIDL): it carries no time. A lookup by fetch id therefore anchors on
the fetched record, found by reading the key's partition of the fetched topic newest first (a trace is
mostly about recent mail, so this stops early), and then reads the other topics' key partitions only
from the anchor's fetch time on (`anchor_since`): every later event is appended after the fetch. A window
(`--since`, `--until`) bounds all of it, and is turned into offsets by the broker's time index
(`offsets_for_time`, append time: the mail topics use LogAppendTime).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.ops.replay import parse_time

Partitioner = Callable[[bytes, int], int]

# Records of later stages are appended after the fetched record, but the anchor is the fetcher's clock
# (`fetched_at`, kept by a replayed copy) and the bound is the broker's: allow this much disagreement.
CLOCK_SKEW = timedelta(minutes=15)
# Offsets per ranged read. A Kafka ranged read costs a client start (0.1 s, far more on a busy machine),
# so a read of small records grows (x4, up to MAX_CHUNK offsets) while it stays under a quarter of
# READ_BUDGET bytes, and shrinks (halves, down to CHUNK) above it: a read holds about the budget, plus
# at most one record more than it (the topics allow 64 MiB records). A read for a key holds only that key's
# records (the log builds no other: services.runtime.log.kept), so a key search grows to MAX_CHUNK; what
# it fetches meanwhile is bounded by the consumer's fetch sizes.
CHUNK = 500
MAX_CHUNK = 50_000
READ_BUDGET = 16 * 1024 * 1024
# How long after its fetch a message's events are looked for, unless --until says otherwise: the
# deliverer's default maximum age of a retry (5 days) plus two days of router lag and tier delays.
# Attempts after a late `dlq retry` fall outside; `--until` reaches them.
HORIZON = timedelta(days=7)


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (org.apache.kafka.common.utils.Utils.murmur2) as an unsigned 32-bit int (as
    aiokafka returns it; Java's int is signed, the same bits)."""
    length = len(data)
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length % 4
    base = length - tail
    if tail == 3:
        h ^= data[base + 2] << 16
    if tail >= 2:
        h ^= data[base + 1] << 8
    if tail >= 1:
        h ^= data[base]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a keyed record: positive murmur2 modulo the count."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


# --- time windows ----------------------------------------------------------------------------------

_AGO = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime) -> datetime:
    """`--since`: a duration back from now (`30m`, `12h`, `7d`, `2w`) or an ISO 8601 time (UTC unless a zone
    is named). ValueError says what is wrong."""
    ago = _AGO.match(text)
    if ago is not None:
        return now - timedelta(**{_UNIT[ago.group(2)]: int(ago.group(1))})
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(f"not a duration (30m, 12h, 7d, 2w) or an ISO 8601 time: {text!r}") from None


@dataclass(frozen=True)
class Window:
    """A time window in ms since the epoch; None: from the oldest record kept / up to the log's end."""

    since_ms: int | None = None
    until_ms: int | None = None

    def anchored(
        self, fetched_ms: int, appended_ms: int, skew: timedelta = CLOCK_SKEW, horizon: timedelta = HORIZON
    ) -> Window:
        """The window for the events after a fetch: from the earlier of the fetch time (the fetcher's clock,
        which a replayed copy keeps) and the fetched record's append time, less CLOCK_SKEW, to `horizon`
        after the later of the two (a copy replayed later is followed to its own events); a --since that
        starts later or an --until given bound it instead."""
        start = min(fetched_ms, appended_ms) - skew // timedelta(milliseconds=1)
        end = max(fetched_ms, appended_ms) + horizon // timedelta(milliseconds=1)
        return Window(start if self.since_ms is None else max(start, self.since_ms),
                      end if self.until_ms is None else self.until_ms)


# --- reads -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRead:
    """Read one partition of `topic` within `window`, keeping the records keyed `key`; not past offset `stop`
    when given (a trace read the fetched topic's newest records already, down to the anchor)."""

    topic: str
    partition: int
    key: bytes
    window: Window
    stop: int | None = None


def key_reads(
    key: bytes, partitions: Mapping[str, int], partitioner: Partitioner, window: Window
) -> list[KeyRead]:
    """Per topic (name -> partition count), the one partition `key` lives on, bounded by `window`. A topic
    with no partitions (not created) is left out."""
    return [KeyRead(topic, partitioner(key, count), key, window) for topic, count in partitions.items()
            if count > 0]


def next_chunk(chunk: int, read_bytes: int, budget: int = READ_BUDGET) -> int:
    """The offsets of the next ranged read, after one of `chunk` offsets returned `read_bytes`."""
    if read_bytes > budget:
        return max(CHUNK, chunk // 2)
    if read_bytes * 4 <= budget:
        return min(MAX_CHUNK, chunk * 4)
    return chunk
