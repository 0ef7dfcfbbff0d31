"""Concurrent awaits that leave nothing running behind a failure.

`asyncio.gather` raises the first failure at once and leaves the other awaitables running as orphan tasks.
In a one-shot command `asyncio.run` then cancels them at shutdown, wherever they are: an aiokafka client
cancelled in the middle of its bootstrap never closes that connection (its cleanup catches KafkaError, not
CancelledError), and the garbage collector later prints "Unclosed AIOKafkaConnection" beside the
command's one-line error (`dlq list` for a user without ACLs: two lookups describing the topic at once,
one refused).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def gather_or_raise(*work: Awaitable[T]) -> list[T]:
    """`asyncio.gather` of `work` that, when some fail, waits for all of them to end, then raises the first
    failure with the others collected (left unretrieved, asyncio prints each one's traceback)."""
    results = await asyncio.gather(*work, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)  # type: ignore[arg-type]  # no exception is left among them
