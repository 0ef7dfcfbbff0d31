"""The bound on the one-shot commands (`topics`, `lag`, `replay`, `trace`, `dlq`): an answer, or exit 3.

A command talks to the log for at most `--timeout` seconds (DEFAULT_TIMEOUT). Within that time a
recoverable failure (the broker restarting, a coordinator not available yet) is tried again with backoff;
when the time is up, the command prints one line, "cannot reach the log", and exits with CANNOT_REACH.
A permanent failure (a refused login, a missing topic) is raised to the caller at once. Every Kafka client
a command opens is closed on every path: the work is cancelled at the deadline and its `finally` blocks
stop the clients before the event loop ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NoReturn, TypeVar

import click

from services.runtime.broker_wait import Backoff
from services.runtime.log import LogError

T = TypeVar("T")
DEFAULT_TIMEOUT = 30.0
CANNOT_REACH = 3  # exit code: the log did not answer within --timeout

timeout_option = click.option(
    "--timeout", type=click.FloatRange(min=0.1), default=DEFAULT_TIMEOUT, show_default=True,
    metavar="SECONDS", help="Give up when the log does not answer within SECONDS (exit code 3).",
)  # fmt: skip


class UnreachableError(Exception):
    """The log did not answer within the command's time; the message says what was tried last."""


async def within(work: Callable[[], Awaitable[T]], timeout: float, *, retry: bool = True) -> T:
    """`work()` retried on recoverable log errors until it succeeds; UnreachableError once `timeout` is spent.
    `retry=False` for work that must not run twice (it writes records): a recoverable error is then
    UnreachableError at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    backoff = Backoff()
    last: LogError | None = None
    while (remaining := deadline - loop.time()) > 0:
        try:
            return await asyncio.wait_for(work(), remaining)
        except TimeoutError:
            break
        except LogError as exc:
            if not exc.retriable:
                raise
            if not retry:
                raise UnreachableError(str(exc)) from None
            last = exc
        await asyncio.sleep(min(backoff.next(), max(0.0, deadline - loop.time())))
    raise UnreachableError(str(last) if last else "no answer")


def unreachable(exc: UnreachableError, timeout: float) -> NoReturn:
    click.echo(f"popbridge: cannot reach the log within {timeout:g} s: {exc}", err=True)
    raise SystemExit(CANNOT_REACH)


def run_bounded(work: Callable[[], Awaitable[T]], timeout: float, *, retry: bool = True) -> T:
    """`asyncio.run` of `work` bounded by `timeout`: its result, or one line and exit 3."""
    with _quiet_clients():
        try:
            return asyncio.run(within(work, timeout, retry=retry))
        except UnreachableError as exc:
            unreachable(exc, timeout)


@contextlib.contextmanager
def _quiet_clients() -> Iterator[None]:
    """aiokafka's own lines stay out of a command's output (its one line says what failed), unless the
    operator asked for DEBUG."""
    clients = logging.getLogger("aiokafka")
    before = clients.level
    if logging.getLogger().level > logging.DEBUG:
        clients.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        clients.setLevel(before)


def timeout_of(ctx: click.Context) -> float:
    """The --timeout of the command being run (DEFAULT_TIMEOUT when it has none)."""
    value: Any = ctx.params.get("timeout", DEFAULT_TIMEOUT)
    return float(value)
