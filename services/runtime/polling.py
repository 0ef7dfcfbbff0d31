"""A poll repeated in the background for the duration of a block, stopped between two polls.

The lag watch and the pipeline gauges read the log every few seconds. Cancelled in the middle of a read,
aiokafka can leave a connection it was opening unclosed (its close is not awaited, or the connection
lands in a client that is already closed). So the block's end asks the loop to stop, lets a poll in
progress finish (up to STOP_GRACE seconds), and cancels only a poll that takes longer than that (the
broker away: the request would only time out).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from services.runtime.broker_wait import sleep_or_stop

STOP_GRACE = 10.0  # seconds a poll in progress may take to finish when the block ends


@contextlib.asynccontextmanager
async def polling(
    poll: Callable[[], Awaitable[None]], interval: float, *, grace: float = STOP_GRACE
) -> AsyncIterator[None]:
    """Run `poll()` now and every `interval` seconds until the block ends. `poll` handles its own errors:
    one it raises ends the loop and is raised when the block ends."""
    stop = asyncio.Event()

    async def repeat() -> None:
        while not stop.is_set():
            await poll()
            if await sleep_or_stop(interval, stop):
                return

    task = asyncio.create_task(repeat())
    try:
        yield
    finally:
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=grace)
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
