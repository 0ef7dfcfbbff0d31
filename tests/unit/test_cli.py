"""services/cli.py: the `popbridge` group as a user meets it, each case in a child process."""

from __future__ import annotations

import signal

from tests.support.stages import signalled

# A command that waits in asyncio with no signal handler of its own, as a stage does while it starts
# and as `router --until-idle` does throughout; registered the way every command is, by name.
WAITING_COMMAND = """
import asyncio, sys
import click
from services import cli

@click.command()
def wait() -> None:
    async def forever() -> None:
        print("ready", flush=True)
        await asyncio.Event().wait()
    asyncio.run(forever())

cli.COMMANDS["wait"] = "__main__:wait"
sys.stderr = sys.stdout  # one stream for the helper to read
cli.main(["wait"])
"""


def test_ctrl_c_where_no_stage_handler_runs_ends_with_one_line_and_exit_130() -> None:
    assert signalled(WAITING_COMMAND, signal.SIGINT) == ("popbridge: interrupted\n", 130)
