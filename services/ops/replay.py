"""Replaying a stage from a point in time: parsing the time and planning the replay (pure).

Two ways, chosen by whether the operator gives `--to`:
- From FROM on (no `--to`): reset the stage's consumer group, like `kafka-consumer-groups --reset-offsets
  --to-datetime`. Each partition of the stage's input goes to the first offset whose record timestamp is
  at or after FROM (the end offset where there is none), and the stage reads on from there to the end.
  The group must be stopped for that (`reset_plan`).
- A window [FROM, TO): copy the records of the window, same key and value, to the end of the same input
  topic, so the running stage processes them again; its group is not touched (`window_plan`). The window
  is fixed in offsets when it is planned and ends at most at the end offsets of that moment, so the
  copies (appended after it) are never part of it.

The topics use LogAppendTime, so "at or after 08:00" means "accepted by the broker at or after 08:00",
and a copy gets the time it was written, outside any window in the past.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from services.runtime.log import TopicPartition


def parse_time(text: str) -> datetime:
    """An ISO 8601 date or date and time; UTC unless it names a zone. ValueError says what is wrong."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"not an ISO 8601 time: {text!r} (e.g. 2026-11-27T08:00, 2026-11-27T08:00+01:00, 2026-11-27)"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_ms(moment: datetime) -> int:
    """Milliseconds since the epoch, exactly (float seconds would round 08:00:00.123 down to .122)."""
    return (moment - _EPOCH) // timedelta(milliseconds=1)


# --- from FROM on: the group reset -----------------------------------------------------------------


@dataclass(frozen=True)
class PartitionReset:
    """One partition's move: from the committed offset (None: never committed) to `new`."""

    topic: str
    partition: int
    current: int | None
    new: int
    end: int

    @property
    def reread(self) -> int:
        """Records the stage will read (again) after the reset."""
        return max(0, self.end - self.new)


@dataclass(frozen=True)
class ResetPlan:
    stage: str
    group: str
    since: datetime
    partitions: tuple[PartitionReset, ...]

    def offsets(self) -> dict[TopicPartition, int]:
        return {TopicPartition(p.topic, p.partition): p.new for p in self.partitions}

    @property
    def changes(self) -> bool:
        return any(p.current != p.new for p in self.partitions)


def reset_plan(
    *,
    stage: str,
    group: str,
    topic: str,
    since: datetime,
    committed: Mapping[int, int],
    targets: Mapping[int, int],
    ends: Mapping[int, int],
) -> ResetPlan:
    """The reset of `group` on `topic` to `targets` (the offsets for FROM), one row per partition."""
    rows = tuple(
        PartitionReset(topic, partition, committed.get(partition), min(targets.get(partition, end), end), end)
        for partition, end in sorted(ends.items())
    )
    return ResetPlan(stage, group, since, rows)


def plan_text(plan: ResetPlan) -> list[str]:
    """The dry-run table: per partition, committed -> new, and what the stage will read again."""
    lines = [f"replay {plan.stage} (group {plan.group}) from {plan.since.isoformat()}"]
    width = max((len(p.topic) for p in plan.partitions), default=5)
    lines.append(f"  {'topic':<{width}}  part  {'committed':>9} -> {'new':<9}  re-read")
    for p in plan.partitions:
        current = "-" if p.current is None else str(p.current)
        lines.append(f"  {p.topic:<{width}}  {p.partition:>4}  {current:>9} -> {p.new:<9}  {p.reread:>7}")
    total = sum(p.reread for p in plan.partitions)
    lines.append(f"  {total} record(s) to read again")
    return lines


# --- a window [FROM, TO): the copy -----------------------------------------------------------------


@dataclass(frozen=True)
class PartitionWindow:
    """The offsets `start <= offset < end` of one partition: the records the window copies."""

    topic: str
    partition: int
    start: int
    end: int

    @property
    def records(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class WindowPlan:
    stage: str
    topic: str
    since: datetime
    until: datetime
    partitions: tuple[PartitionWindow, ...]

    @property
    def records(self) -> int:
        return sum(p.records for p in self.partitions)


def window_plan(
    *,
    stage: str,
    topic: str,
    since: datetime,
    until: datetime,
    starts: Mapping[int, int],
    stops: Mapping[int, int],
    ends: Mapping[int, int],
) -> WindowPlan:
    """The window of `topic` between `starts` (the offsets for FROM) and `stops` (for TO), per partition.

    Both are clamped to `ends`, the end offsets when planning: what is written later (the copies among
    it) is outside the window, whatever its timestamp.
    """
    rows = []
    for partition, end in sorted(ends.items()):
        start = min(starts.get(partition, end), end)
        rows.append(PartitionWindow(topic, partition, start, max(start, min(stops.get(partition, end), end))))
    return WindowPlan(stage, topic, since, until, tuple(rows))


def window_text(plan: WindowPlan) -> list[str]:
    """The dry-run table of a window replay: per partition, the offsets copied and how many."""
    lines = [f"replay {plan.stage} from {plan.since.isoformat()} to {plan.until.isoformat()}: "
             f"copy the window to the end of {plan.topic}"]
    width = max((len(p.topic) for p in plan.partitions), default=5)
    lines.append(f"  {'topic':<{width}}  part  {'from..to':>21}  records")  # `to` excluded
    for p in plan.partitions:
        span = f"{p.start}..{p.end}" if p.records else "-"
        lines.append(f"  {p.topic:<{width}}  {p.partition:>4}  {span:>21}  {p.records:>7}")
    lines.append(f"  {plan.records} record(s) to copy; the group and the running stage are not touched")
    return lines
