"""What the operator tools and the health watch need of a log (`OpsLog`, provided by KafkaLog and
EmbeddedLog), and a stage's lag read through it.

The commands built on it live in services.ops; the health watch and the pipeline gauges
(services.runtime.health, .pipeline_gauges) read the lag here too. Cost of `stage_lag`: per input topic a
few offset lookups, plus one single-record read per lagging partition.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Protocol

from services.runtime.gathering import gather_or_raise
from services.runtime.lag import StageLag, lag_report, position
from services.runtime.log import LogError, LogRefusedError, Record, TopicPartition
from services.runtime.stages import Stage


class GroupMember(Protocol):
    """A live consumer of a group, as far as the ops commands show it."""

    @property
    def member_id(self) -> str: ...

    @property
    def client(self) -> str: ...


class RangeReader(Protocol):
    """Offset lookups and ranged reads: how the ops commands read topics (services.ops.reader). Offsets are
    per partition. Every method raises `LogError` when the log cannot answer."""

    async def start_offsets(self, topic: str) -> dict[int, int]:
        """The offset of the earliest record still kept."""
        ...

    async def end_offsets(self, topic: str) -> dict[int, int]:
        """The offset the next record written will get."""
        ...

    async def offsets_for_time(self, topic: str, timestamp_ms: int) -> dict[int, int]:
        """The first offset whose record timestamp is >= `timestamp_ms`, else the end offset."""
        ...

    async def read(
        self, topic: str, partition: int, start: int, end: int, *, key: bytes | None = None
    ) -> list[Record]:
        """The records with `start <= offset < end` of one partition; only those keyed `key` when given (a
        key search builds no record for the others: services.runtime.log.kept)."""
        ...


class OpsLog(RangeReader, Protocol):
    """What the ops commands need of a log. A group's committed offset is the next record it will read.
    Every method raises `LogError` when the log cannot answer."""

    def reading(self) -> AbstractAsyncContextManager[RangeReader]:
        """A reader for many lookups and reads in a row (on Kafka one client for all of them, where each
        call on the log starts its own)."""
        ...

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        """The group's committed offsets (partitions it never committed on are absent)."""
        ...

    async def active_members(self, group: str) -> Sequence[GroupMember]:
        """The group's live consumers (empty when it has none)."""
        ...

    async def set_committed(
        self, group: str, offsets: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        """Move a stopped group's offsets (clamped to the records kept); refused (LogError, not retriable)
        while it has live consumers. Returns the offsets set."""
        ...

    def scan(self, topic: str) -> AsyncIterator[Record]:
        """Every record of `topic`, from its beginning to its end at the time of the call."""
        ...


# --- lag -------------------------------------------------------------------------------------------


async def stage_lag(log: OpsLog, stage: Stage, now: datetime) -> StageLag:
    """The lag of `stage`'s group on each of its topics; a topic not created yet is listed as missing."""
    ends: dict[TopicPartition, int] = {}
    committed: dict[TopicPartition, int] = {}
    starts: dict[TopicPartition, int] = {}
    missing: list[str] = []
    for topic in stage.topics:
        topic_ends = await _ends_or_none(log, topic)
        if not topic_ends:
            missing.append(topic)
            continue
        topic_starts = await log.start_offsets(topic)
        topic_committed = await log.committed(stage.group, topic)
        for partition, end in topic_ends.items():
            tp = TopicPartition(topic, partition)
            ends[tp], starts[tp] = end, topic_starts.get(partition, 0)
            if partition in topic_committed:
                committed[tp] = topic_committed[partition]
    oldest = await oldest_timestamps(log, ends, committed, starts)
    rows = lag_report(ends, committed, oldest, now, starts)
    return StageLag(stage.name, stage.group, rows, tuple(missing), waits=stage.waits)


async def _ends_or_none(log: OpsLog, topic: str) -> dict[int, int] | None:
    try:
        return await log.end_offsets(topic)
    except LogError as exc:
        if exc.retriable or isinstance(exc, LogRefusedError):
            raise
        return None  # the embedded log's "unknown topic": the stage has not created it yet


async def oldest_timestamps(
    log: OpsLog, ends: Mapping[TopicPartition, int], committed: Mapping[TopicPartition, int],
    starts: Mapping[TopicPartition, int],
) -> dict[TopicPartition, int]:
    """The timestamp (ms) of the record at the group's position, for every partition with lag."""
    waiting = {tp: position(committed.get(tp), starts.get(tp, 0)) for tp in ends}
    waiting = {tp: offset for tp, offset in waiting.items() if offset < ends[tp]}
    found = await gather_or_raise(*(log.read(tp.topic, tp.partition, o, o + 1) for tp, o in waiting.items()))
    return {tp: records[0].timestamp_ms for tp, records in zip(waiting, found, strict=True) if records}
