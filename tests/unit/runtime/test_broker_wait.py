"""Waiting for the broker and bounding one-shot commands (services.runtime.broker_wait, .oneshot)."""

from __future__ import annotations

import asyncio

import pytest

from services.ops.oneshot import UnreachableError, within
from services.runtime.broker_wait import Backoff, first_log_error, unwrapped, wait_until
from services.runtime.log import LogError
from services.runtime.outage import BrokerOutage


class RefusedError(LogError):
    def __init__(self, message: str, *, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


class Broker:
    """A probe that fails `failures` times (recoverably), then answers."""

    def __init__(self, failures: int, *, permanent: bool = False) -> None:
        self.failures = failures
        self.permanent = permanent
        self.calls = 0

    async def probe(self) -> None:
        self.calls += 1
        if self.permanent:
            raise RefusedError("topic missing", retriable=False)
        if self.calls <= self.failures:
            raise RefusedError("Unable to bootstrap")


def test_backoff_doubles_up_to_its_cap_and_starts_over_after_a_success() -> None:
    backoff = Backoff(first=0.5, cap=4.0)  # the default cap is MAX_DELAY
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.next() == 0.5


async def test_a_stage_waits_until_the_broker_answers() -> None:
    broker = Broker(failures=3)
    outage = BrokerOutage(clock=lambda: 0.0)
    assert await wait_until(broker.probe, "test: waiting", backoff=Backoff(first=0.0), broker=outage)
    assert broker.calls == 4
    assert not outage.down  # the success ended the outage


async def test_a_permanent_failure_is_raised_at_once() -> None:
    broker = Broker(failures=0, permanent=True)
    with pytest.raises(RefusedError, match="topic missing"):
        await wait_until(broker.probe, "test: waiting", backoff=Backoff(first=0.0), broker=BrokerOutage())
    assert broker.calls == 1


async def test_stopping_ends_the_wait() -> None:
    stop = asyncio.Event()
    broker = Broker(failures=10**9)

    async def probe() -> None:
        if broker.calls == 2:
            stop.set()
        await broker.probe()

    assert not await wait_until(probe, "test: waiting", stop=stop, backoff=Backoff(first=0.0),
                                broker=BrokerOutage())


async def test_a_one_shot_command_retries_a_transient_failure_within_its_time() -> None:
    broker = Broker(failures=2)

    async def work() -> str:
        await broker.probe()
        return "answer"

    assert await within(work, timeout=30.0) == "answer"


async def test_a_one_shot_command_gives_up_when_its_time_is_spent() -> None:
    async def hangs() -> None:
        await asyncio.Event().wait()

    with pytest.raises(UnreachableError, match="no answer"):
        await within(hangs, timeout=0.05)


async def test_a_one_shot_command_that_writes_is_not_run_twice() -> None:
    broker = Broker(failures=1)
    with pytest.raises(UnreachableError, match="Unable to bootstrap"):
        await within(broker.probe, timeout=30.0, retry=False)
    assert broker.calls == 1


async def test_a_task_groups_log_error_comes_out_as_itself() -> None:
    async def fails() -> None:
        raise RefusedError("SASL refused", retriable=False)

    async def group() -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(fails())

    with pytest.raises(RefusedError, match="SASL refused"):
        await unwrapped(group())


def test_a_group_without_log_error_stays_a_group() -> None:
    group = ExceptionGroup("bugs", [ValueError("x")])
    assert first_log_error(group) is group
