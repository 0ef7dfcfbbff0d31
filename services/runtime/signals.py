"""Stopping on SIGTERM and SIGINT. A container's PID 1 ignores SIGTERM unless it handles it, and then
Kubernetes waits out the grace period and kills the stage instead of letting it stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM or SIGINT sets, in the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    return stop


async def until_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """Run `work` until it ends (its result) or `stop` is set (it is cancelled; None).

    Only for work that cancellation leaves safe, such as a POP3 pass: a session dropped before QUIT
    deletes nothing.
    """
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None
