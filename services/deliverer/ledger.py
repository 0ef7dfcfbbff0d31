"""The delivered ledger: the (fetch id, recipient) pairs already handed over, read from a compacted topic.

The deliverer consults it before every send, so a redelivered offset, a rebalance or a router replay
delivers only the pairs that were not delivered before. It reads the whole topic at start and catches up
again before each batch, so a pair another replica delivered counts as soon as it is on the log.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TypeVar

from schemas.codec import EventDecodeError, decode
from schemas.events import RecipientDelivered
from services.runtime.log import LogConsumer, Record

logger = logging.getLogger(__name__)
T = TypeVar("T")


def decode_record(record: Record, cls: type[T]) -> T | None:
    """The event a record holds, or None (logged) for one that is not a valid `cls`: it is skipped."""
    try:
        return decode(record.value, cls)
    except EventDecodeError as exc:
        _log_skipped(record, exc)
        return None


def _log_skipped(record: Record, exc: Exception) -> None:
    logger.error("%s[%d]@%d skipped: %s", record.topic, record.partition, record.offset, exc)


def ledger_key(fetch_id: str, recipient: str) -> bytes:
    """The compaction key of one pair."""
    return f"{fetch_id}\x00{recipient}".encode()


async def read_to_end(consumer: LogConsumer, poll_seconds: float = 0.5) -> list[Record]:
    """Every record from the consumer's position to the end of its partitions (as of when it catches up)."""
    records: list[Record] = []
    while not await consumer.caught_up():
        records.extend(await consumer.fetch(poll_seconds))
    return records


class Ledger:
    """The pairs delivered so far, as read from the ledger topic plus those this process just recorded."""

    def __init__(self, consumer: LogConsumer) -> None:
        self._consumer = consumer
        self._pairs: set[tuple[str, str]] = set()
        self._reading = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._pairs)

    def delivered(self, fetch_id: str, recipient: str) -> bool:
        return (fetch_id, recipient) in self._pairs

    def add(self, entry: RecipientDelivered) -> None:
        self._pairs.add((entry.fetch_id, entry.recipient))

    async def catch_up(self) -> None:
        """Read what was recorded since the last call (the first call reads the whole topic)."""
        async with self._reading:
            for record in await read_to_end(self._consumer, poll_seconds=0.2):
                entry = decode_record(record, RecipientDelivered)
                if entry is not None:
                    self.add(entry)
