"""services/runtime/signals.py: a long-running stage stops on SIGTERM instead of being killed."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.runtime.signals import until_stopped


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


def signalled(script: str, signum: signal.Signals) -> tuple[str, int]:
    """Run `script` in a child process (so the signal never reaches pytest itself), send it `signum`
    once it printed "ready", and return what it printed after that and its exit code."""
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                          cwd=Path(__file__).resolve().parents[3]) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n"
            child.send_signal(signum)
            out, _ = child.communicate(timeout=20)
        finally:
            child.kill()  # no-op once it exited; ends it when an assertion failed first
    return out, child.returncode


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
