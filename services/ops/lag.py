"""`popbridge lag`'s judgement and rendering of the lag figures (pure): thresholds, exit codes, text, JSON.

The figures themselves (services.runtime.lag) are shared with the health watch and the metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.runtime.lag import StageLag

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
