"""services/runtime/signals.py: a long-running stage stops on SIGTERM instead of being killed."""

from __future__ import annotations

import asyncio
import os
import signal

from services.runtime.signals import stop_on_signals, until_stopped


async def test_work_that_ends_gives_its_result() -> None:
    async def work() -> int:
        return 7

    assert await until_stopped(work(), asyncio.Event()) == 7


async def test_a_stop_cancels_the_work() -> None:
    cancelled = asyncio.Event()

    async def work() -> int:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    stop = asyncio.Event()
    running = asyncio.ensure_future(until_stopped(work(), stop))
    await asyncio.sleep(0)
    stop.set()
    assert await running is None
    assert cancelled.is_set()


async def test_sigterm_sets_the_stop_event() -> None:
    stop = stop_on_signals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), timeout=5)
    finally:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
