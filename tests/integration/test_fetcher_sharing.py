"""Fetcher replicas share the mailboxes through the consumer group on the real broker and Dovecot: two
`popbridge fetcher` processes poll disjoint mailboxes, and when one is killed the other takes over; a
replica joining never polls a mailbox while the old owner's pass of it still runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.fetcher.commands import open_fetch_memory, poll_shared
from services.fetcher.service import Fetcher, PassResult
from services.runtime.settings import Mailbox
from tests.support.dovecot import DovecotMailboxes, MailUser
from tests.support.fetcher import FetcherStage, dovecot_mailbox, replica_environment
from tests.support.mail_config import mailbox, write_mail_config

pytestmark = pytest.mark.integration

POPBRIDGE = str(Path(sys.executable).with_name("popbridge"))
MAILBOXES = 20
TAKEOVER_DEADLINE = 60.0
_POLLING = re.compile(r"mailbox assignment: polling \d+ of \d+ mailboxes \([^)]*\): ?(.*)$")


def message(mailbox: int, number: int) -> bytes:
    head = f"From: a@example.test\r\nTo: alice@example.com\r\nSubject: {mailbox}/{number}\r\n"
    return f"{head}\r\nHi.\r\n".encode()


def write_config(path: Path, dovecot: DovecotMailboxes, users: Sequence[MailUser]) -> Path:
    boxes = [
        mailbox(f"box{n}", dovecot.server.host, dovecot.server.pop3_port, user.login,
                password_env=f"PW_box{n}", mode="keep", poll_interval=1.0, timeout=10.0)
        for n, user in enumerate(users)
    ]
    return write_mail_config(path, delivery={"host": "127.0.0.1", "tls": "none"}, mailboxes=boxes)


class Replica:
    """One `popbridge fetcher` process; its log says which mailboxes it polls."""

    def __init__(self, process: asyncio.subprocess.Process, log_file: Path) -> None:
        self.process = process
        self.log_file = log_file

    def owned(self) -> set[str]:
        """The mailboxes of the replica's latest assignment line (none before the first)."""
        lines = [m.group(1) for m in map(_POLLING.search, self.log_file.read_text().splitlines()) if m]
        return set(filter(None, lines[-1].split(","))) if lines else set()


@asynccontextmanager
async def replica(config: Path, env: dict[str, str], log_file: Path) -> AsyncIterator[Replica]:
    with log_file.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            POPBRIDGE, "fetcher", "--config", str(config), env=env, stdout=output, stderr=output
        )
    try:
        yield Replica(process, log_file)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait for `condition`; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def published_until(stage: FetcherStage, expected: int, timeout: float) -> Counter[tuple[str, str]]:
    """(mailbox, UIDL) -> how often published, once at least `expected` pairs were published."""
    counts: Counter[tuple[str, str]] = Counter()

    async def read() -> None:
        counts.clear()
        counts.update((e.mailbox_id, e.uidl) for e in await stage.published())

    started = time.monotonic()
    await read()
    while len(counts) < expected and time.monotonic() - started < timeout:
        await asyncio.sleep(0.3)
        await read()
    return counts


async def test_two_replicas_share_the_mailboxes_and_the_survivor_takes_over_a_killed_ones(
    kafka_bootstrap: str, kafka_topic_prefix: str, dovecot: DovecotMailboxes, tmp_path: Path
) -> None:
    stage = FetcherStage(kafka_bootstrap, kafka_topic_prefix)
    await stage.create_topics(shared=True)
    users = [dovecot.new_user(f"box{n}") for n in range(MAILBOXES)]
    every = {f"box{n}" for n in range(MAILBOXES)}
    config = write_config(tmp_path / "fetcher.toml", dovecot, users)
    env = replica_environment(stage, {f"PW_box{n}": u.password for n, u in enumerate(users)})
    async with (
        replica(config, env, tmp_path / "a.log") as a,
        replica(config, env, tmp_path / "b.log") as b,
    ):

        def shared() -> bool:
            mine, theirs = a.owned(), b.owned()
            return bool(mine) and bool(theirs) and mine.isdisjoint(theirs) and mine | theirs == every

        await until(shared, 30, "two replicas owning disjoint mailboxes that cover all")
        for n, user in enumerate(users):
            dovecot.deliver(user, message(n, 1))
        counts = await published_until(stage, MAILBOXES, timeout=20)
        assert {m for m, _ in counts} == every
        assert shared()  # no rebalance in between: each mailbox was polled by one replica

        victims = b.owned()
        b.process.send_signal(signal.SIGKILL)  # no LeaveGroup: the group notices by the session timeout
        await b.process.wait()
        killed = time.monotonic()
        for n, user in enumerate(users):
            dovecot.deliver(user, message(n, 2))
        counts = await published_until(stage, 2 * MAILBOXES, timeout=TAKEOVER_DEADLINE)
        takeover = time.monotonic() - killed
        print(f"takeover: the killed replica's {len(victims)} mailboxes drained {takeover:.1f} s after kill")

        assert len(counts) == 2 * MAILBOXES, f"published after the kill: {sorted(counts)}"
        assert takeover < TAKEOVER_DEADLINE
        assert a.owned() == every
    assert [pair for pair, times in counts.items() if times > 1] == []  # keep mode: nothing published twice


SLOW_PASS = 1.5  # seconds each pass of the handover test is held before its POP3 session
HANDOVER = "waiting for the passes of"


@dataclass(frozen=True)
class Span:
    replica: str
    mailbox_id: str
    start: float
    end: float


@dataclass
class SlowFetcher(Fetcher):
    """A Fetcher whose passes take SLOW_PASS longer, each recorded in `spans` (start and end)."""

    name: str = ""
    spans: list[Span] = field(default_factory=list)
    # Set once the passes should stay open until the rebalance has seen them: otherwise a rebalance that falls
    # between two passes (a loaded machine) hands over nothing and the handover goes unexercised.
    hold: Callable[[], bool] = lambda: False
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def poll(self, mailbox: Mailbox) -> PassResult:
        start = time.monotonic()
        try:
            await asyncio.sleep(SLOW_PASS)
            if self.hold():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.released.wait(), 20)
            return await super().poll(mailbox)
        finally:
            self.spans.append(Span(self.name, mailbox.id, start, time.monotonic()))


async def test_a_joining_replica_never_polls_a_mailbox_while_the_old_owners_pass_of_it_runs(
    kafka_bootstrap: str, kafka_topic_prefix: str, dovecot: DovecotMailboxes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="popbridge.fetcher")
    stage = FetcherStage(kafka_bootstrap, kafka_topic_prefix)
    await stage.create_topics(shared=True)
    users = [dovecot.new_user(f"hand{n}") for n in range(6)]
    mailboxes = [
        dovecot_mailbox(dovecot, user, f"hand{n}", mode="keep", poll_interval=1.0)
        for n, user in enumerate(users)
    ]
    environ = {f"PW_hand{n}": user.password for n, user in enumerate(users)}
    for n, user in enumerate(users):
        dovecot.deliver(user, message(n, 1))
    spans: list[Span] = []
    joining = False
    handed_over = asyncio.Event()

    class Handover(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if HANDOVER in record.getMessage():
                handed_over.set()

    async def run_replica(name: str) -> None:
        async with open_fetch_memory(stage.log, stage.settings) as memory, stage.log.producer() as producer:
            fetcher = SlowFetcher(
                settings=stage.settings, producer=producer, memory=memory, environ=environ, name=name,
                spans=spans, hold=lambda: name == "a" and joining, released=handed_over,
            )  # fmt: skip
            await poll_shared(stage.log, stage.settings, fetcher, mailboxes)

    def polled_by(name: str) -> set[str]:
        return {s.mailbox_id for s in spans if s.replica == name}

    handler = Handover()
    logging.getLogger("popbridge.fetcher").addHandler(handler)
    a = asyncio.create_task(run_replica("a"))
    try:
        await until(lambda: polled_by("a") == {m.id for m in mailboxes}, 20, "replica a polling all")
        joined = time.monotonic()
        joining = True  # a's passes from now on stay open until the rebalance has waited for them
        b = asyncio.create_task(run_replica("b"))
        try:
            await until(lambda: bool(polled_by("b")), 20, "replica b polling mailboxes of its own")
            await asyncio.sleep(2 * SLOW_PASS)  # passes of both replicas, after the rebalance
        finally:
            b.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await b
    finally:
        a.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await a
        logging.getLogger("popbridge.fetcher").removeHandler(handler)

    overlaps = [
        (first, second)
        for first in spans
        for second in spans
        if first.mailbox_id == second.mailbox_id and first.replica == "a" and second.replica == "b"
        and first.start < second.end and second.start < first.end
    ]  # fmt: skip
    assert overlaps == []
    # The handover was exercised: the rebalance waited for passes of a in flight.
    assert handed_over.is_set()
    assert polled_by("a") & polled_by("b"), "no mailbox moved from a to b"
    assert all(s.start > joined for s in spans if s.replica == "b")
    counts = Counter((e.mailbox_id, e.uidl) for e in await stage.published())
    assert [pair for pair, times in counts.items() if times > 1] == []  # keep mode: nothing published twice
