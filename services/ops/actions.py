"""What the operator commands do on the log: plan and apply a replay, copy a window, collect a trace.

The decisions are pure and live beside this module (`replay`, `trace`); this one gathers their inputs
through services.runtime.ops_log.OpsLog (KafkaLog and EmbeddedLog both provide it) and reads topics only
through services.ops.reader.

Costs, for the operator who runs them on a busy system:
- replay plan: three offset lookups; executing it: one offset commit. A window replay (`--to`) reads
  the window in ranged reads of 100 offsets and writes each record once more (bodies included);
- trace: reads the fetched, routed, delivery-attempt and dead-letter topics from their beginning (their
  retention: 14, 14, 30 and 90 days), message bodies included. Fine for an occasional question; a
  frequent one wants an index (a compacted topic keyed by fetch id, or the partition of the fetch id,
  which is the Kafka key of every event about a message).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Protocol

from schemas.events import DeliveryAttempted, DeliveryDeadLettered, MailFetched, RecipientsResolved
from schemas.topics import DEAD_LETTERS, DELIVERY_ATTEMPTS, FETCHED, ROUTED
from services.ops.reader import events, read_chunks
from services.ops.replay import PartitionWindow, ResetPlan, WindowPlan, reset_plan, to_ms, window_plan
from services.ops.trace import Step, TracedEvent, TraceQuery, step_of, timelines
from services.runtime.log import LogProducer, Outgoing, TopicPartition
from services.runtime.ops_log import OpsLog
from services.runtime.settings import DeploymentSettings
from services.runtime.stages import Stage

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

TRACE_TOPICS = (FETCHED, ROUTED, DELIVERY_ATTEMPTS, DEAD_LETTERS)  # in the order the fetch ids are learnt
_TRACED: tuple[type[TracedEvent], ...] = (
    MailFetched, RecipientsResolved, DeliveryAttempted, DeliveryDeadLettered,
)


async def collect_trace(log: OpsLog, settings: DeploymentSettings, ident: str) -> dict[str, list[Step]]:
    """Per fetch id of the message `ident` names, its steps across the topics (see the module's costs)."""
    query = TraceQuery(ident)
    steps: list[Step] = []
    for name in TRACE_TOPICS:
        async for record, event in events(log, settings.topic(name), _TRACED):
            if query.matches(event):
                steps.append(step_of(record, event))
    return timelines(steps)
