"""The threads the embedded log's blocking SQLite work runs on (one connection each, work in call order),
and the in-process wake-up that lets a waiting fetch see an append or a group change at once.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from services.runtime.embedded.schema import Synchronous, connect, wrap_error

Clock = Callable[[], float]
P = ParamSpec("P")
T = TypeVar("T")


class Worker:
    """One thread holding one SQLite connection; the log's blocking work runs there, in call order."""

    def __init__(self, path: Path, synchronous: Synchronous) -> None:
        self._path = path
        self._synchronous: Synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="popbridge-log")
        self._conn: sqlite3.Connection | None = None

    async def run(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: self._call(fn, *args, **kwargs))

    def _call(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        try:
            if self._conn is None:
                self._conn = connect(self._path, self._synchronous)
            return fn(self._conn, *args, **kwargs)
        except sqlite3.Error as exc:
            raise wrap_error(exc, self._path) from exc

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_connection)
        finally:
            self._executor.shutdown(wait=True)


class Changes:
    """Wakes the waiting fetches of this process when a producer appended or a group changed."""

    def __init__(self) -> None:
        self.count = 0
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        self.count += 1
        for waiter in self._waiters:
            waiter.get_loop().call_soon_threadsafe(_resolve, waiter)

    async def wait(self, since: int, seconds: float) -> None:
        """Wait up to `seconds` unless something changed after `count` was `since`."""
        if self.count != since:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait([waiter], timeout=seconds)
        finally:
            self._waiters.discard(waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
