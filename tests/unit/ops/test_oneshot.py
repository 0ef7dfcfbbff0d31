"""services/ops/oneshot.py: concurrent reads of a one-shot command fail as one."""

from __future__ import annotations

import pytest

from services.ops.oneshot import gather_or_raise
from services.runtime.log import LogError


async def test_gather_or_raise_gives_results_in_order_or_the_first_failure() -> None:
    async def value(n: int) -> int:
        return n

    async def failing(message: str) -> int:
        raise LogError(message)

    assert await gather_or_raise(value(1), value(2)) == [1, 2]
    with pytest.raises(LogError, match="first"):
        await gather_or_raise(failing("first"), failing("second"))
