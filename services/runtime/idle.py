"""Waiting until a stage has caught up, for `--until-idle`: every record of its input is committed."""

from __future__ import annotations

import asyncio
from typing import Protocol


class OffsetSource(Protocol):
    async def end_offsets(self, topic: str) -> dict[int, int]: ...

    async def committed(self, group: str, topic: str) -> dict[int, int]: ...


def is_idle(ends: dict[int, int], committed: dict[int, int]) -> bool:
    """Caught up: each partition's committed offset has reached its end (empty partitions need none)."""
    return all(committed.get(partition, 0) >= end for partition, end in ends.items())


async def wait_until_idle(
    log: OffsetSource, group: str, topics: list[str], *, poll: float = 0.5, settle: int = 2
) -> None:
    """Return once `group` has committed everything in `topics` on `settle` consecutive polls."""
    streak = 0
    while streak < settle:
        await asyncio.sleep(poll)
        states = [is_idle(await log.end_offsets(t), await log.committed(group, t)) for t in topics]
        streak = streak + 1 if all(states) else 0
