"""Consumer lag per stage and partition, and the age of the oldest unprocessed message (pure).

The figures the health watch, the metrics and `popbridge lag` share; how `lag` judges and prints them
(thresholds, exit codes, text and JSON) is services.ops.lag.

lag = end offset - the group's position, where the position is the committed offset, or the log start
when the group never committed there or its offset fell out of retention (the stages read from the
earliest record then). The age of the oldest unprocessed message is `now` minus the timestamp of the
record at that position: the topics use LogAppendTime, so it is when the broker accepted it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from services.runtime.log import TopicPartition


@dataclass(frozen=True)
class PartitionLag:
    """One partition of one input topic of a stage."""

    topic: str
    partition: int
    committed: int | None  # None: the group never committed on this partition
    end: int
    lag: int
    oldest_age: float | None  # seconds; None when nothing waits (or the record could not be read)


@dataclass(frozen=True)
class StageLag:
    """A stage's consumer group across its input topics."""

    stage: str
    group: str
    partitions: tuple[PartitionLag, ...]
    missing_topics: tuple[str, ...] = ()
    waits: bool = False  # records wait on purpose (a retry tier): no alert on its lag

    @property
    def total(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def oldest_age(self) -> float | None:
        ages = [p.oldest_age for p in self.partitions if p.oldest_age is not None]
        return max(ages) if ages else None

    def committed_offsets(self) -> dict[TopicPartition, int]:
        known = [p for p in self.partitions if p.committed is not None]
        return {TopicPartition(p.topic, p.partition): p.committed for p in known if p.committed is not None}


def position(committed: int | None, start: int) -> int:
    """Where the group reads next: its commit, or the log start when it has none or retention passed it."""
    return start if committed is None else max(committed, start)


def lag_report(
    ends: Mapping[TopicPartition, int],
    committed: Mapping[TopicPartition, int],
    oldest_timestamps: Mapping[TopicPartition, int],
    now: datetime,
    starts: Mapping[TopicPartition, int] | None = None,
) -> tuple[PartitionLag, ...]:
    """Per partition of `ends`: committed, end, lag and the age of the record at the position.

    `oldest_timestamps` holds, in ms, the timestamp of the record at each lagging partition's position;
    `starts` the log start offsets (0 where absent).
    """
    now_ms = now.timestamp() * 1000
    rows: list[PartitionLag] = []
    for tp, end in sorted(ends.items()):
        lag = max(0, end - position(committed.get(tp), (starts or {}).get(tp, 0)))
        timestamp = oldest_timestamps.get(tp) if lag else None
        age = None if timestamp is None else max(0.0, (now_ms - timestamp) / 1000)
        rows.append(PartitionLag(tp.topic, tp.partition, committed.get(tp), end, lag, age))
    return tuple(rows)
