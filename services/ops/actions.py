"""What the operator commands do on the log: plan and apply a replay, copy a window, collect a trace.

The decisions are pure and live beside this module (`replay`, `trace`); this one gathers their inputs
through services.runtime.ops_log.OpsLog (KafkaLog and EmbeddedLog both provide it) and reads topics only
through services.ops.reader.

Costs, for the operator who runs them on a busy system:
- replay plan: three offset lookups; executing it: one offset commit. A window replay (`--to`) reads
  the window in ranged reads of 100 offsets and writes each record once more (bodies included);
- trace of a fetch id: on the fetched, routed, delivery-attempt and dead-letter topics, only the one
  partition the fetch id (every event's key) lives on; the fetched one newest first until the message's
  fetched record (cost: the records fetched since, on that partition), the others from that fetch on
  (services.ops.locate; the fetched one only up to that record), within `--since`/`--until`. By
  Message-ID: one partition of the router's by-message-id topic names the copies' fetch ids; without it,
  the routed topic within the window. All of it through one reader (`OpsLog.reading`: on Kafka a few
  consumers; a client per lookup and read made a trace of recent mail 2.4 s instead of 0.5 s).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Protocol

from schemas.events import DeliveryAttempted, DeliveryDeadLettered, MailFetched, RecipientsResolved
from schemas.topics import DEAD_LETTERS, DELIVERY_ATTEMPTS, FETCHED, ROUTED
from services.ops.locate import KeyRead, Partitioner, Window, kafka_partition, key_reads
from services.ops.reader import decoded, keyed, partition_counts, read_chunks, windowed
from services.ops.replay import PartitionWindow, ResetPlan, WindowPlan, reset_plan, to_ms, window_plan
from services.ops.trace import Step, TracedEvent, TraceQuery, is_message_id, step_of, timelines
from services.runtime.embedded import EmbeddedLog
from services.runtime.embedded.records import partition_for_key
from services.runtime.gathering import gather_or_raise
from services.runtime.log import LogProducer, Outgoing, Record, TopicPartition
from services.runtime.ops_log import OpsLog, RangeReader
from services.runtime.settings import DeploymentSettings
from services.runtime.stages import Stage, router_repartition_topic

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
    chunks = read_chunks(log, window.topic, window.partition, window.start, window.end, chunk=chunk)
    async for records in chunks:
        await producer.send_all([Outgoing(window.topic, r.value, key=r.key) for r in records])
        copied += len(records)
    return copied


# --- trace -----------------------------------------------------------------------------------------

TRACE_TOPICS = (FETCHED, ROUTED, DELIVERY_ATTEMPTS, DEAD_LETTERS)
_TRACED: tuple[type[TracedEvent], ...] = (
    MailFetched, RecipientsResolved, DeliveryAttempted, DeliveryDeadLettered,
)


_EVERYTHING = Window()


def partitioner_of(log: OpsLog) -> Partitioner:
    """The partitioner the log's producers use: the embedded log's own, else Kafka's default."""
    return partition_for_key if isinstance(log, EmbeddedLog) else kafka_partition


async def collect_trace(
    log: OpsLog, settings: DeploymentSettings, ident: str, window: Window = _EVERYTHING
) -> dict[str, list[Step]]:
    """Per fetch id of the message `ident` names (a fetch id, or a Message-ID: it has an @), its steps
    across the topics within `window` (see services.ops.locate for what is read)."""
    partitioner = partitioner_of(log)
    async with log.reading() as reads:
        if not is_message_id(ident):
            return timelines(await _fetch_id_steps(reads, partitioner, settings, ident, window))
        fetch_ids = await message_fetch_ids(reads, partitioner, settings, ident, window)
        found = await gather_or_raise(*(_fetch_id_steps(reads, partitioner, settings, f, window)
                                        for f in sorted(fetch_ids)))
    return timelines(step for steps in found for step in steps)


async def _fetch_id_steps(
    log: RangeReader, partitioner: Partitioner, settings: DeploymentSettings, fetch_id: str, window: Window
) -> list[Step]:
    """The fetch id's steps: anchored on its fetched record (newest first), then its partition of each
    topic from the fetch on; the fetched topic only up to the anchor (what is newer was read)."""
    topics = [settings.topic(name) for name in TRACE_TOPICS]
    key = fetch_id.encode()
    reads = key_reads(key, await partition_counts(log, topics), partitioner, window)
    anchor = await _fetched_anchor(log, [r for r in reads if r.topic == topics[0]])
    later = window if anchor is None else window.anchored(*_anchor_times(anchor))
    stop = None if anchor is None else anchor[0].offset + 1
    found = await gather_or_raise(*(
        _steps(log, KeyRead(r.topic, r.partition, key, later, stop if r.topic == topics[0] else None),
               fetch_id)
        for r in reads))
    return [step for steps in found for step in steps]


async def _fetched_anchor(log: RangeReader, reads: list[KeyRead]) -> tuple[Record, MailFetched] | None:
    """The key's newest fetched record and its event, or None when none is kept (see Window.anchored)."""
    for read in reads:
        async for record in keyed(log, read, newest_first=True):
            for pair in decoded((record,), (MailFetched,)):
                return pair
    return None


def _anchor_times(anchor: tuple[Record, MailFetched]) -> tuple[int, int]:
    """The anchor's `fetched_at` and its append time (ms)."""
    return to_ms(anchor[1].fetched_at), anchor[0].timestamp_ms


async def _steps(log: RangeReader, read: KeyRead, fetch_id: str) -> list[Step]:
    records = [record async for record in keyed(log, read)]
    query = TraceQuery(fetch_id)
    return [step_of(record, event) for record, event in decoded(records, _TRACED) if query.matches(event)]


async def message_fetch_ids(
    log: RangeReader, partitioner: Partitioner, settings: DeploymentSettings, message_id: str, window: Window
) -> set[str]:
    """The fetch ids of the copies of a message: from the faust router's by-message-id topic (keyed by
    Message-ID, so one partition is read), else from the routed records within `window`, every partition
    (the plain router has no such topic, and single-user mail does not pass through it)."""
    query = TraceQuery(message_id)
    by_message_id = router_repartition_topic(settings)
    reads = key_reads(query.ident.encode("utf-8", "surrogateescape"),
                      await partition_counts(log, [by_message_id]), partitioner, window)
    for read in reads:
        records = [record async for record in keyed(log, read)]
        for _, resolved in decoded(records, (RecipientsResolved,)):
            query.matches(resolved)
    if query.fetch_ids:
        return query.fetch_ids
    routed = settings.topic(ROUTED)
    async for record in windowed(log, routed, window):
        for _, event in decoded((record,), (RecipientsResolved,)):
            query.matches(event)
    return query.fetch_ids
