"""A popbridge stage as its own OS process, as an operator runs it: started with a test's topics and groups,
its stderr read as it comes, and SIGTERM'd at the end of the block, where it must exit 0 without a traceback.

    async with stage_process("deliverer", config, stage_environ(bootstrap, settings)) as stage:
        assert "Unable connect to" in await stage.next_line()

`signalled` runs a short script the same way, for a signal test that must never signal pytest itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from services.runtime.settings import DeploymentSettings

LINE_TIMEOUT = 60.0  # seconds a test waits for the stage's next line
STOP_TIMEOUT = 60.0  # seconds a SIGTERM'd stage may take to exit


def stage_environ(bootstrap: str, settings: DeploymentSettings, **extra: str) -> dict[str, str]:
    """This process's environment with the broker, the test's prefixes and text logs (`extra` added)."""
    return {
        **os.environ, "POPBRIDGE_KAFKA_BOOTSTRAP": bootstrap, "POPBRIDGE_TOPIC_PREFIX": settings.topic_prefix,
        "POPBRIDGE_GROUP_PREFIX": settings.group_prefix, "POPBRIDGE_LOG_FORMAT": "text", **extra,
    }  # fmt: skip


@dataclass
class StageProcess:
    """The running stage and every stderr line it wrote so far."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    _new: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    async def next_line(self, timeout: float = LINE_TIMEOUT) -> str:
        """The next line the stage writes ("" once it exited)."""
        return await asyncio.wait_for(self._new.get(), timeout)

    async def read_all(self) -> None:
        """Drain stderr (a full pipe would block the stage) until it ends."""
        assert self.process.stderr is not None
        while True:
            line = (await self.process.stderr.readline()).decode()
            if line:
                self.lines.append(line)
            self._new.put_nowait(line)
            if not line:
                return


@asynccontextmanager
async def stage_process(
    name: str, config: Path, environ: Mapping[str, str], *options: str
) -> AsyncIterator[StageProcess]:
    """`popbridge NAME --config CONFIG OPTIONS...`; at the end it must still run, then exit 0 on SIGTERM
    without a traceback."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", name, "--config", str(config), *options,
        env=dict(environ), stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stage = StageProcess(process)
    reading = asyncio.create_task(stage.read_all())
    try:
        yield stage
        assert process.returncode is None, f"{name} exited: {''.join(stage.lines)[-3000:]}"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        finally:
            if process.returncode is None:
                process.kill()
            with suppress(asyncio.CancelledError):
                await reading
    output = "".join(stage.lines)
    assert process.returncode == 0, output[-3000:]
    assert "Traceback" not in output


# Python installs its KeyboardInterrupt handler at startup only where SIGINT is not ignored, and a child
# inherits an ignored SIGINT: pytest started as a background job (`cmd &` in a script) passes one on, through
# pytest-xdist's workers, to every script here. Each starts with the handler an interactive run gets.
_DEFAULT_SIGINT = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"


def signalled(script: str, signum: signal.Signals) -> tuple[str, int]:
    """Run `script` in a child process (so the signal never reaches pytest itself), send it `signum`
    once it printed "ready", and return what it printed after that and its exit code."""
    with subprocess.Popen([sys.executable, "-c", _DEFAULT_SIGINT + script], stdout=subprocess.PIPE, text=True,
                          cwd=Path(__file__).resolve().parents[2]) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n"
            child.send_signal(signum)
            out, _ = child.communicate(timeout=20)
        finally:
            child.kill()  # no-op once it exited; ends it when an assertion failed first
    return out, child.returncode
