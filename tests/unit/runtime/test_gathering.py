"""services/runtime/gathering.py: concurrent awaits fail as one, and leave nothing running."""

from __future__ import annotations

import asyncio

import pytest

from services.runtime.gathering import gather_or_raise
from services.runtime.log import LogError


async def test_gather_or_raise_gives_results_in_order_or_the_first_failure() -> None:
    async def value(n: int) -> int:
        return n

    async def failing(message: str) -> int:
        raise LogError(message)

    assert await gather_or_raise(value(1), value(2)) == [1, 2]
    with pytest.raises(LogError, match="first"):
        await gather_or_raise(failing("first"), failing("second"))


async def test_a_failure_is_raised_only_once_the_others_have_ended() -> None:
    # asyncio.gather would raise at once and leave `slow` running, for asyncio.run to cancel wherever it is
    # (an aiokafka bootstrap cancelled midway leaks its connection).
    ended: list[str] = []

    async def slow() -> int:
        await asyncio.sleep(0.05)
        ended.append("slow")
        return 1

    async def refused() -> int:
        raise LogError("not authorized")

    with pytest.raises(LogError, match="not authorized"):
        await gather_or_raise(refused(), slow())
    assert ended == ["slow"]
