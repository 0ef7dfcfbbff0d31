"""The operator tools' reads and writes on the log: lag, replay and trace, on Kafka or the embedded log.

The computations are pure and live beside this module (`lag`, `replay`, `trace`); this one gathers their
inputs through `OpsLog`, which both `KafkaLog` and `EmbeddedLog` provide.

Costs, for the operator who runs them on a busy system:
- lag: per input topic a few offset lookups, plus one single-record read per lagging partition;
- replay plan: three offset lookups; executing it: one offset commit. A window replay (`--to`) reads
  the window in ranged reads of 100 offsets and writes each record once more (bodies included);
- trace: reads the fetched, routed, delivery-attempt and dead-letter topics from their beginning (their
  retention: 14, 14, 30 and 90 days), message bodies included. Fine for an occasional question; a
  frequent one wants an index (a compacted topic keyed by fetch id, or the partition of the fetch id,
  which is the Kafka key of every event about a message).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Protocol

from schemas import codec
from schemas.events import DeliveryAttempted, DeliveryDeadLettered, MailFetched, RecipientsResolved
from schemas.topics import DEAD_LETTERS, DELIVERY_ATTEMPTS, FETCHED, ROUTED
from services.runtime.lag import StageLag, lag_report, position
from services.runtime.log import LogError, LogProducer, LogRefusedError, Outgoing, Record, TopicPartition
from services.runtime.replay import PartitionWindow, ResetPlan, WindowPlan, reset_plan, to_ms, window_plan
from services.runtime.settings import DeploymentSettings
from services.runtime.stages import Stage
from services.runtime.trace import Step, TraceQuery, step_of, timelines


class GroupMember(Protocol):
    """A live consumer of a group, as far as the ops commands show it."""

    @property
    def member_id(self) -> str: ...

    @property
    def client(self) -> str: ...


class OpsLog(Protocol):
    """What the ops commands need of a log. Offsets are per partition; a group's committed offset is the
    next record it will read. Every method raises `LogError` when the log cannot answer."""

    async def start_offsets(self, topic: str) -> dict[int, int]:
        """The offset of the earliest record still kept."""
        ...

    async def end_offsets(self, topic: str) -> dict[int, int]:
        """The offset the next record written will get."""
        ...

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        """The group's committed offsets (partitions it never committed on are absent)."""
        ...

    async def offsets_for_time(self, topic: str, timestamp_ms: int) -> dict[int, int]:
        """The first offset whose record timestamp is >= `timestamp_ms`, else the end offset."""
        ...

    async def read(self, topic: str, partition: int, start: int, end: int) -> list[Record]:
        """The records with `start <= offset < end` of one partition."""
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
    found = await asyncio.gather(*(log.read(tp.topic, tp.partition, o, o + 1) for tp, o in waiting.items()))
    return {tp: records[0].timestamp_ms for tp, records in zip(waiting, found, strict=True) if records}


# --- replay ----------------------------------------------------------------------------------------


async def plan_replay(log: OpsLog, stage: Stage, since: datetime) -> ResetPlan:
    """Where `stage`'s group would move on its input topic to replay from `since`."""
    topic = stage.replay_topic
    return reset_plan(
        stage=stage.name,
        group=stage.group,
        topic=topic,
        since=since,
        committed=await log.committed(stage.group, topic),
        targets=await log.offsets_for_time(topic, to_ms(since)),
        ends=await log.end_offsets(topic),
    )


async def execute_replay(log: OpsLog, plan: ResetPlan) -> dict[TopicPartition, int]:
    """Apply the plan; the log refuses (LogError) while the group has live consumers."""
    return await log.set_committed(plan.group, plan.offsets())


class CopyLog(OpsLog, Protocol):
    """The ops log plus a producer: what a window replay writes with."""

    def producer(self) -> AbstractAsyncContextManager[LogProducer]: ...


async def plan_window(log: OpsLog, stage: Stage, since: datetime, until: datetime) -> WindowPlan:
    """The records of `stage`'s input topic accepted in [since, until), fixed as offsets now."""
    topic = stage.replay_topic
    ends = await log.end_offsets(topic)  # first: whatever is written after this is outside the window
    return window_plan(
        stage=stage.name,
        topic=topic,
        since=since,
        until=until,
        starts=await log.offsets_for_time(topic, to_ms(since)),
        stops=await log.offsets_for_time(topic, to_ms(until)),
        ends=ends,
    )


async def copy_window(log: CopyLog, plan: WindowPlan, *, chunk: int = 100) -> dict[int, int]:
    """Write each record of the window once more to its topic, same key and value, in offset order per
    partition (a key hashes to the partition it came from). Returns the records copied per partition.

    The stage's group is not touched, so the stage may keep running. A failure part way leaves the copies
    written so far in place (the ledger and the dedupe make a second run harmless, if wasteful)."""
    async with log.producer() as producer:
        return {p.partition: await _copy(log, producer, p, chunk) for p in plan.partitions}


async def _copy(log: OpsLog, producer: LogProducer, window: PartitionWindow, chunk: int) -> int:
    copied = 0
    for start in range(window.start, window.end, chunk):
        records = await log.read(window.topic, window.partition, start, min(window.end, start + chunk))
        await producer.send_all([Outgoing(window.topic, r.value, key=r.key) for r in records])
        copied += len(records)
    return copied


async def read_range(
    log: OpsLog, topic: str, partition: int, start: int, end: int, *, chunk: int = 100
) -> AsyncIterator[Record]:
    """The records of one partition from `start` up to `end`, read `chunk` offsets at a time."""
    while start < end:
        upto = min(end, start + chunk)
        for record in await log.read(topic, partition, start, upto):
            yield record
        start = upto


# --- trace -----------------------------------------------------------------------------------------

TRACE_TOPICS = (FETCHED, ROUTED, DELIVERY_ATTEMPTS, DEAD_LETTERS)  # in the order the fetch ids are learnt
_TRACED = (MailFetched, RecipientsResolved, DeliveryAttempted, DeliveryDeadLettered)


async def collect_trace(log: OpsLog, settings: DeploymentSettings, ident: str) -> dict[str, list[Step]]:
    """Per fetch id of the message `ident` names, its steps across the topics (see the module's costs)."""
    query = TraceQuery(ident)
    steps: list[Step] = []
    for name in TRACE_TOPICS:
        async for record in log.scan(settings.topic(name)):
            try:
                event = codec.decode_any(record.value)
            except codec.EventDecodeError:
                continue  # a foreign record is not part of any message's story
            if isinstance(event, _TRACED) and query.matches(event):
                steps.append(step_of(record, event))
    return timelines(steps)
