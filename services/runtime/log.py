"""The small log interface every stage uses: topics, partitions, offsets, consumer groups, commit.

Two implementations stand behind it: Apache Kafka (`services.runtime.kafka`) and the embedded SQLite log
for one machine (`services.runtime.embedded`). Stages depend only on these Protocols, so the same stage
code runs on either.

Contracts:
- `LogProducer.send` returns only once the record is durable (Kafka: acknowledged by all in-sync
  replicas, idempotent producer). It raises `LogError` when it cannot make it durable.
- `LogConsumer.fetch` returns records of the assigned partitions in offset order per partition.
- `LogConsumer.commit` takes the offset of the NEXT record to read per partition, and is to be called
  only after the outcome of every earlier record is itself durable. A commit the group refuses because
  it moved on (a rebalance gave the partitions to another member) raises a retriable LogError: normal
  life for a consumer group, the new owner reads those records again (services.runtime.kafka_faults).
- `LogError.retriable`: True when waiting (reconnecting, rejoining) can get past it; False for a
  permanent problem (a refused login, a missing topic or right), on which a stage exits with one line.
- `Log.consumer(..., on_revoked=...)` is awaited with the partitions this consumer is about to lose,
  before the group hands them to another member: the new owner gets them only after it returned (it
  must return within REVOKE_TIMEOUT). While a rebalance takes partitions away, `assignment` leaves them
  out.
- `Log.consumer(..., co_partitioned=True)` assigns partition N of every subscribed topic to one member
  (Kafka's range assignor; the topics must have equal partition counts, which the caller checks): the
  records of one key, on whichever of the topics, are all read by one member.
- `LogConsumer.pause_at(tp, offset)` sets the partition back to `offset` and returns none of its records
  until `resume`; a rebalance that takes the partition away forgets the pause.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from schemas.topics import TopicSpec

REVOKE_TIMEOUT = 60.0  # seconds an `on_revoked` callback may take before the group moves on without it
# Seconds without a heartbeat before the broker drops a member (every stage's groups, the router's faust app
# too). A SIGKILLed replica's partitions, and the rejoin after a broker restart that lost a member, wait this
# long: at the clients' classic 10 s a kill shortly before a broker stop held delivery 11-12 s after the
# broker was back (chaos seed 7). 6 s is the broker's default floor (group.min.session.timeout.ms); with a
# heartbeat every 2 s a member survives two lost heartbeats. A false expiry costs a rebalance, not mail.
GROUP_SESSION_TIMEOUT = 6.0
GROUP_HEARTBEAT_INTERVAL = 2.0


class LogError(Exception):
    """The log could not do what was asked. `retriable` says whether trying again later can help."""

    retriable: bool = True


class LogRefusedError(LogError):
    """The log refused this user what was asked (authorization). Waiting will not help, and it is not a
    missing topic either: the user's rights must change."""

    retriable = False


@dataclass(frozen=True, order=True)
class TopicPartition:
    topic: str
    partition: int


@dataclass(frozen=True)
class Record:
    """One record read from the log."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


def kept(offset: int, key: bytes | None, start: int, end: int, wanted: bytes | None) -> bool:
    """Whether a ranged read keeps a record: `start <= offset < end`, and keyed `wanted` when one is given.
    Asked before the record is built: a key search over 150k records built them all, which took a third
    of a 13-day-old message's trace (cProfile), to keep a handful."""
    return start <= offset < end and (wanted is None or key == wanted)


@dataclass(frozen=True)
class Outgoing:
    """One record to write."""

    topic: str
    value: bytes
    key: bytes | None = None
    partition: int | None = None
    """Where it goes; None: the partition of its key (or any, for a keyless record). The deliverer sets it
    so that a ledger record, keyed by pair for compaction, lands in its fetch id's partition."""


@dataclass(frozen=True)
class Written:
    """Where a durable record landed."""

    topic: str
    partition: int
    offset: int


OnRevoked = Callable[[set[TopicPartition]], Awaitable[None]]


class LogProducer(Protocol):
    async def send(self, record: Outgoing) -> Written:
        """Write one record; returns once it is durable."""
        ...

    async def send_all(self, records: Sequence[Outgoing]) -> list[Written]:
        """Write several records concurrently; returns once every one is durable, in the given order."""
        ...


class LogConsumer(Protocol):
    async def fetch(self, timeout: float, max_records: int = 500) -> list[Record]:
        """The next records of the assigned partitions; an empty list when none arrived within `timeout`."""
        ...

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Record, per partition, the offset of the next record to read."""
        ...

    async def caught_up(self, ignoring: Collection[TopicPartition] = ()) -> bool:
        """True when every assigned partition but those of `ignoring` has been read to its end (used by
        --until-idle)."""
        ...

    async def pause_at(self, tp: TopicPartition, offset: int) -> None:
        """Read `tp` again from `offset`, once `resume`d: until then, fetch returns none of its records."""
        ...

    async def resume(self, tps: Collection[TopicPartition]) -> None:
        """Fetch the paused partitions of `tps` again (from the offset they were paused at)."""
        ...

    def assignment(self) -> set[TopicPartition]:
        """The partitions the group assigns to this consumer now (empty before the first assignment and
        while a rebalance takes them away). Kept current by `fetch`: call it regularly."""
        ...


class Log(Protocol):
    """A durable, partitioned log: Kafka or the embedded one."""

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> list[str]:
        """Create the topics that do not exist yet; returns the names created."""
        ...

    def producer(self) -> AbstractAsyncContextManager[LogProducer]: ...

    def scan(self, topic: str) -> AsyncIterator[Record]:
        """Every record of `topic`, from its beginning to its end at the time of the call."""
        ...

    async def end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset the next record written will get."""
        ...

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        """Per partition, the group's committed offset (absent where the group never committed)."""
        ...

    def read_from(self, topic: str, starts: Mapping[int, int]) -> AsyncIterator[list[Record]]:
        """The records of the partitions of `starts`, each from its start offset to the partition's end at
        the time of the call, in batches (offset order per partition). A start past the end reads nothing."""
        ...

    def consumer(
        self, group: str, topics: Sequence[str], *, on_revoked: OnRevoked | None = None,
        co_partitioned: bool = False,
    ) -> AbstractAsyncContextManager[LogConsumer]:
        """A member of consumer group `group`. `on_revoked` is awaited with the partitions it is losing
        before another member gets them (a graceful rebalance; not when this member dies or stalls).
        `co_partitioned`: partition N of every topic goes to the same member."""
        ...


def next_offsets(records: Sequence[Record]) -> dict[TopicPartition, int]:
    """The commit that covers `records`: per partition, one past the highest offset seen."""
    offsets: dict[TopicPartition, int] = {}
    for record in records:
        offsets[record.tp] = max(offsets.get(record.tp, 0), record.offset + 1)
    return offsets
