"""Waiting out the broker: at start (a stage started before Kafka) and after a recoverable failure.

`wait_until` retries a probe with capped exponential backoff until it succeeds or `stop` is set; a
recoverable failure is reported through services.runtime.outage (one line per wait window), a permanent
one (LogError with `retriable` False: a refused login, a missing topic) is raised for the caller to exit
with. The backoff is capped at MAX_DELAY so a stage notices a returning broker within seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar, runtime_checkable

from services.runtime.log import LogError
from services.runtime.outage import BROKER, BrokerOutage

T = TypeVar("T")
FIRST_DELAY = 0.5
MAX_DELAY = 2.0  # a stage tries again at least every 2 s: back within seconds of the broker


@dataclass
class Backoff:
    """Delays FIRST_DELAY, twice that, ... capped at MAX_DELAY; `reset` after a success."""

    first: float = FIRST_DELAY
    cap: float = MAX_DELAY
    attempt: int = 0

    def next(self) -> float:
        delay: float = min(self.cap, self.first * 2.0**self.attempt)
        self.attempt = min(self.attempt + 1, 32)
        return delay

    def reset(self) -> None:
        self.attempt = 0


async def sleep_or_stop(seconds: float, stop: asyncio.Event | None) -> bool:
    """Sleep `seconds`; True when `stop` was set meanwhile (returns at once then)."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def wait_until(
    probe: Callable[[], Awaitable[None]],
    what: str,
    *,
    stop: asyncio.Event | None = None,
    backoff: Backoff | None = None,
    broker: BrokerOutage = BROKER,
) -> bool:
    """Call `probe` until it returns (True) or `stop` is set (False). A recoverable LogError is logged
    within the outage bound and retried; a permanent one propagates."""
    backoff = backoff or Backoff()
    while stop is None or not stop.is_set():
        try:
            await probe()
        except LogError as exc:
            if not exc.retriable:
                raise
            broker.failed(f"{what}: {exc}")
            if await sleep_or_stop(backoff.next(), stop):
                return False
            continue
        broker.recovered()
        return True
    return False


@runtime_checkable
class ReadyCheck(Protocol):
    async def check_ready(self, topics: Sequence[str]) -> None:
        """Return once the log answers and `topics` exist (services.runtime.kafka.KafkaLog)."""
        ...


async def broker_ready(log: object, topics: Sequence[str], stage: str, stop: asyncio.Event | None) -> bool:
    """A long-running stage's start: wait (with backoff, one line per wait window) until the log answers
    and its topics exist; True then, False when `stop` came first. Only Kafka is waited for: the embedded
    log is a local file. Raises the LogError of a permanent problem (a refused login, a missing topic)."""
    if not isinstance(log, ReadyCheck):
        return True
    return await wait_until(partial(log.check_ready, topics), f"{stage}: waiting for the broker", stop=stop)


async def unwrapped(work: Awaitable[T]) -> T:
    """Await `work`; a task group's ExceptionGroup holding a LogError is raised as that LogError, so the
    caller can tell a recoverable failure from a permanent one (and exit with one line, no traceback)."""
    try:
        return await work
    except BaseExceptionGroup as group:
        raise first_log_error(group) from None


def first_log_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first LogError among a task group's failures (nested groups included), else the group itself."""
    for exc in group.exceptions:
        found = first_log_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if isinstance(found, LogError):
            return found
    return group
