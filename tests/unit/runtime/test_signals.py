"""services/runtime/signals.py: a long-running stage stops on SIGTERM instead of being killed."""

from __future__ import annotations

import asyncio
import signal

import pytest

from services.runtime.signals import until_stopped
from tests.support.stages import signalled


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


CHILD = """
import asyncio, sys
from services.runtime.signals import stop_on_signals

async def main() -> None:
    stop = stop_on_signals()
    print("ready", flush=True)
    await stop.wait()
    print("stopped", flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_sets_the_stop_event_and_the_process_ends_cleanly(signum: signal.Signals) -> None:
    assert signalled(CHILD, signum) == ("stopped\n", 0)

STOP_SIGNALS_CHILD = """
import asyncio, signal
from services.runtime.signals import StopSignals

async def main() -> None:
    with StopSignals() as signals:
        print("ready", flush=True)
        await signals.stop.wait()
    print(signals.received.name, signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_names_the_signal_and_removes_its_handlers(signum: signal.Signals) -> None:
    assert signalled(STOP_SIGNALS_CHILD, signum) == (f"{signum.name} True\n", 0)


LOGGED_CHILD = """
import asyncio, logging, sys
from services.runtime.signals import stop_on_signals

logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

async def main() -> None:
    stop = stop_on_signals()
    print("ready", flush=True)
    await stop.wait()

asyncio.run(main())
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stage_says_in_one_line_which_signal_stops_it(signum: signal.Signals) -> None:
    expected = f"{signum.name} received: stopping at the next safe point\n"
    assert signalled(LOGGED_CHILD, signum) == (expected, 0)
