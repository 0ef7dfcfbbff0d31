"""Fetcher replicas share the mailboxes through the consumer group on the real broker and Dovecot: two
`popbridge fetcher` processes poll disjoint mailboxes, and when one is killed the other takes over."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from schemas.topics import FETCH_ASSIGNMENT, TopicSpec, topic_spec
from tests.support.dovecot import DovecotMailboxes, MailUser
from tests.support.fetcher import FetcherStage

pytestmark = pytest.mark.integration

POPBRIDGE = str(Path(sys.executable).with_name("popbridge"))
MAILBOXES = 20
TAKEOVER_DEADLINE = 60.0
_POLLING = re.compile(r"mailbox assignment: polling \d+ of \d+ mailboxes \([^)]*\): ?(.*)$")


def message(mailbox: int, number: int) -> bytes:
    head = f"From: a@example.test\r\nTo: alice@example.com\r\nSubject: {mailbox}/{number}\r\n"
    return f"{head}\r\nHi.\r\n".encode()


def write_config(path: Path, dovecot: DovecotMailboxes, users: Sequence[MailUser]) -> Path:
    boxes = "".join(
        f'[[mailboxes]]\nid = "box{n}"\nhost = "{dovecot.server.host}"\nport = {dovecot.server.pop3_port}\n'
        f'tls = "none"\nusername = "{user.login}"\npassword_env = "PW_box{n}"\nmode = "keep"\n'
        'recipients = ["alice@example.com"]\npoll_interval = 0.5\ntimeout = 10.0\n\n'
        for n, user in enumerate(users)
    )
    path.write_text(f'[delivery]\nhost = "127.0.0.1"\ntls = "none"\n\n{boxes}')
    return path


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
    await stage.create_topics()
    spec = topic_spec(FETCH_ASSIGNMENT)
    await stage.log.ensure_topics([TopicSpec(stage.settings.topic(spec.name), spec.partitions, spec.config)])
    users = [dovecot.new_user(f"box{n}") for n in range(MAILBOXES)]
    every = {f"box{n}" for n in range(MAILBOXES)}
    config = write_config(tmp_path / "fetcher.toml", dovecot, users)
    env = {k: v for k, v in os.environ.items() if not k.startswith("POPBRIDGE_")} | {
        "POPBRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap, "POPBRIDGE_TOPIC_PREFIX": kafka_topic_prefix,
        "POPBRIDGE_GROUP_PREFIX": kafka_topic_prefix, "POPBRIDGE_LOG_LEVEL": "INFO",
        "POPBRIDGE_LOG_FORMAT": "text", **{f"PW_box{n}": u.password for n, u in enumerate(users)},
    }  # fmt: skip
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
