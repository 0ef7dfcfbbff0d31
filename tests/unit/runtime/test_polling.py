"""services/runtime/polling.py: a background poll ends between two polls, not in the middle of one."""

from __future__ import annotations

import asyncio

from services.runtime.polling import polling


async def test_the_block_ends_after_the_poll_in_progress_finished() -> None:
    started, release, finished = asyncio.Event(), asyncio.Event(), []

    async def poll() -> None:
        started.set()
        await release.wait()
        finished.append(True)

    async def end_soon() -> None:
        await started.wait()
        release.set()

    async with polling(poll, interval=3600):
        await started.wait()
        ending = asyncio.create_task(end_soon())
    await ending
    assert finished == [True]  # not cancelled half-way


async def test_a_poll_that_outlasts_the_grace_is_cancelled() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def poll() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with polling(poll, interval=3600, grace=0.01):
        await started.wait()
    assert cancelled.is_set()


async def test_polls_repeat_every_interval_until_the_block_ends() -> None:
    polls: list[int] = []
    third = asyncio.Event()

    async def poll() -> None:
        polls.append(len(polls))
        if len(polls) == 3:
            third.set()

    async with polling(poll, interval=0.001):
        await third.wait()
    assert polls[:3] == [0, 1, 2]
