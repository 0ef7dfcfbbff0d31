"""Consumer lag per stage and partition, and the age of the oldest unprocessed message (pure).

lag = end offset - the group's position, where the position is the committed offset, or the log start
when the group never committed there or its offset fell out of retention (the stages read from the
earliest record then). The age of the oldest unprocessed message is `now` minus the timestamp of the
record at that position: the topics use LogAppendTime, so it is when the broker accepted it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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


# `popbridge lag`'s exit codes, the convention of Nagios-style check runners, whatever the flags.
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3  # UNKNOWN: the log could not be read (unreachable, refused)


@dataclass(frozen=True)
class Thresholds:
    """Alert limits: a stage's total lag (messages) and the oldest unprocessed message's age (seconds);
    the `max_*` pair warns, the `critical_*` pair is critical."""

    max_lag: int | None = None
    max_age: float | None = None
    critical_lag: int | None = None
    critical_age: float | None = None


def breaches(stages: Sequence[StageLag], limits: Thresholds) -> list[str]:
    """One line per exceeded warning limit; empty when every stage is within them."""
    return _exceeded(stages, limits.max_lag, limits.max_age)


def critical_breaches(stages: Sequence[StageLag], limits: Thresholds) -> list[str]:
    """One line per exceeded critical limit."""
    return _exceeded(stages, limits.critical_lag, limits.critical_age)


def lag_status(stages: Sequence[StageLag], limits: Thresholds) -> int:
    """OK, WARNING or CRITICAL: the worst limit exceeded. Stages that wait on purpose never count."""
    if critical_breaches(stages, limits):
        return CRITICAL
    return WARNING if breaches(stages, limits) else OK


def _exceeded(stages: Sequence[StageLag], max_lag: int | None, max_age: float | None) -> list[str]:
    found: list[str] = []
    for stage in (s for s in stages if not s.waits):
        if max_lag is not None and stage.total > max_lag:
            found.append(f"{stage.stage}: lag {stage.total} > {max_lag}")
        oldest = stage.oldest_age
        if max_age is not None and oldest is not None and oldest > max_age:
            found.append(f"{stage.stage}: oldest unprocessed message {oldest:.0f}s old > {max_age:g}s")
    return found


def lag_json(stages: Sequence[StageLag], limits: Thresholds, now: datetime) -> dict[str, Any]:
    """The machine-readable report of `popbridge lag --json`."""
    return {
        "checked_at": now.isoformat(),
        "stages": [
            {
                "stage": s.stage,
                "group": s.group,
                "total_lag": s.total,
                "oldest_age_seconds": s.oldest_age,
                "missing_topics": list(s.missing_topics),
                "thresholds_apply": not s.waits,
                "partitions": [
                    {"topic": p.topic, "partition": p.partition, "committed": p.committed, "end": p.end,
                     "lag": p.lag, "oldest_age_seconds": p.oldest_age}
                    for p in s.partitions
                ],
            }
            for s in stages
        ],
        "breaches": breaches(stages, limits),
        "critical": critical_breaches(stages, limits),
        "status": _STATUS_NAMES[lag_status(stages, limits)],
    }


def lag_text(stages: Sequence[StageLag], limits: Thresholds) -> list[str]:
    """The table `popbridge lag` prints."""
    lines: list[str] = []
    for s in stages:
        waiting = " (waiting on purpose: no alert)" if s.waits else ""
        lines.append(f"{s.stage} (group {s.group}): lag {s.total}, oldest {_age(s.oldest_age)}{waiting}")
        width = max((len(p.topic) for p in s.partitions), default=5)
        lines.append(f"  {'topic':<{width}}  part  committed        end        lag  oldest")
        lines += [
            f"  {p.topic:<{width}}  {p.partition:>4}  {_offset(p.committed):>9}  {p.end:>9}  {p.lag:>9}  "
            f"{_age(p.oldest_age)}"
            for p in s.partitions
        ]
        lines += [f"  {topic}: no such topic yet" for topic in s.missing_topics]
    lines += [f"CRITICAL: {line}" for line in critical_breaches(stages, limits)]
    lines += [f"THRESHOLD EXCEEDED: {line}" for line in breaches(stages, limits)]
    return lines


_STATUS_NAMES = {OK: "ok", WARNING: "warning", CRITICAL: "critical"}


def _offset(value: int | None) -> str:
    return "-" if value is None else str(value)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
