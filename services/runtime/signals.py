"""Stopping on SIGTERM and SIGINT. A container's PID 1 ignores SIGTERM unless it handles it, and then
Kubernetes waits out the grace period and kills the stage instead of letting it stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable
from types import TracebackType
from typing import Self, TypeVar

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_logger = logging.getLogger(__name__)


def stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM or SIGINT sets, in the running loop; the first says so in one line."""
    return StopSignals().stop  # the loop's handlers hold the StopSignals; its context is never left


class StopSignals:
    """SIGTERM and SIGINT handlers in the running loop: the first sets `stop`, says so in one line, and
    stays in `received` (for an exit code). As a context manager the handlers are removed on exit, for a
    command that may run more than once in a process (`popbridge run` from tests)."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.received: signal.Signals | None = None
        self._loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            self._loop.add_signal_handler(signum, self._receive, signum)

    def _receive(self, signum: signal.Signals) -> None:
        if self.received is None:
            _logger.info("%s received: stopping at the next safe point", signum.name)
            self.received = signum
            self.stop.set()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum in STOP_SIGNALS:
            with contextlib.suppress(ValueError, RuntimeError):  # the loop may be closing already
                self._loop.remove_signal_handler(signum)


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
