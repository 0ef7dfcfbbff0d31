"""Replaying a stage from a point in time: parsing the time and planning the offset reset (pure).

Like `kafka-consumer-groups --reset-offsets --to-datetime`: each partition of the stage's input goes to
the first offset whose record timestamp is at or after FROM (the end offset where there is none). The
topics use LogAppendTime, so "at or after 08:00" means "accepted by the broker at or after 08:00".

`--to` does not stop the stage: once its group is rewound the stage reads on to the end of the topic,
processing the records after TO again too (the deliverer's ledger keeps a copy from being delivered
twice). The plan shows, per partition, where TO falls, so the size of the window is visible; a shadow
replay (`--shadow`) does stop at TO.
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


@dataclass(frozen=True)
class PartitionReset:
    """One partition's move: from the committed offset (None: never committed) to `new`."""

    topic: str
    partition: int
    current: int | None
    new: int
    end: int
    window_end: int | None = None  # the first offset at or after --to

    @property
    def reread(self) -> int:
        """Records the stage will read (again) after the reset."""
        return max(0, self.end - self.new)

    @property
    def in_window(self) -> int | None:
        return None if self.window_end is None else max(0, self.window_end - self.new)


@dataclass(frozen=True)
class ResetPlan:
    stage: str
    group: str
    since: datetime
    until: datetime | None
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
    until: datetime | None,
    committed: Mapping[int, int],
    targets: Mapping[int, int],
    ends: Mapping[int, int],
    window_ends: Mapping[int, int] | None = None,
) -> ResetPlan:
    """The reset of `group` on `topic` to `targets` (the offsets for FROM), one row per partition."""
    rows = tuple(
        PartitionReset(
            topic, partition, committed.get(partition), min(targets.get(partition, end), end), end,
            None if window_ends is None else window_ends.get(partition, end),
        )
        for partition, end in sorted(ends.items())
    )
    return ResetPlan(stage, group, since, until, rows)


def plan_text(plan: ResetPlan) -> list[str]:
    """The dry-run table: per partition, committed -> new, and what the stage will read again."""
    window = f" to {plan.until.isoformat()}" if plan.until else ""
    lines = [f"replay {plan.stage} (group {plan.group}) from {plan.since.isoformat()}{window}"]
    width = max((len(p.topic) for p in plan.partitions), default=5)
    header = f"  {'topic':<{width}}  part  {'committed':>9} -> {'new':<9}  re-read"
    lines.append(header + ("  in window" if plan.until else ""))
    for p in plan.partitions:
        current = "-" if p.current is None else str(p.current)
        row = f"  {p.topic:<{width}}  {p.partition:>4}  {current:>9} -> {p.new:<9}  {p.reread:>7}"
        lines.append(row + (f"  {p.in_window:>9}" if p.in_window is not None else ""))
    total = sum(p.reread for p in plan.partitions)
    lines.append(f"  {total} record(s) to read again")
    if plan.until:
        lines.append(
            "  note: --to does not stop the stage; it reads on past TO to the end of the topic"
            " (the 'in window' column counts the records before TO)"
        )
    return lines
