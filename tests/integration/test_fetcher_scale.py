"""The fetcher at scale on the real broker and Dovecot: a killed `popbridge fetcher` comes back from its
fetch-state store reading only the changelog's tail (and publishes nothing twice), and no more than
`max_parallel_mailboxes` POP3 sessions run at once."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas import codec
from schemas.events import FetchRecorded, fetch_state_key
from schemas.topics import FETCH_STATE
from services.runtime.log import Outgoing
from tests.integration.test_fetcher_sharing import message, write_config
from tests.support.dovecot import DovecotMailboxes
from tests.support.fetcher import FetcherStage, dovecot_mailbox, replica_environment

pytestmark = pytest.mark.integration

POPBRIDGE = str(Path(sys.executable).with_name("popbridge"))
_READ_AT_START = re.compile(r"fetch state: (\d+) records read from the changelog")
HISTORY = 400  # fetch-state records of a mailbox no longer configured: history a restart must not re-read


def records_read_at_starts(log_file: Path) -> list[int]:
    return [int(m.group(1)) for m in map(_READ_AT_START.search, log_file.read_text().splitlines()) if m]


async def test_a_killed_fetcher_restarts_from_its_store_reading_only_the_tail_and_publishes_nothing_twice(
    kafka_bootstrap: str, kafka_topic_prefix: str, dovecot: DovecotMailboxes, tmp_path: Path
) -> None:
    stage = FetcherStage(kafka_bootstrap, kafka_topic_prefix)
    await stage.create_topics(shared=True)
    old = [FetchRecorded(mailbox_id="gone", uidl=f"u{k}", fetch_id=f"f{k}", size=1, sha256="0" * 64,
                         published_at=datetime.now(UTC)) for k in range(HISTORY)]  # fmt: skip
    async with stage.log.producer() as producer:
        topic = stage.settings.topic(FETCH_STATE)
        await producer.send_all(
            [Outgoing(topic, codec.encode(r), fetch_state_key("gone", r.uidl)) for r in old]
        )
    users = [dovecot.new_user(f"kill{n}") for n in range(3)]
    for n, user in enumerate(users):
        dovecot.deliver_many(user, [message(n, 1), message(n, 2)])
    config = write_config(tmp_path / "fetcher.toml", dovecot, users)
    passwords = {f"PW_box{n}": u.password for n, u in enumerate(users)}
    env = replica_environment(stage, passwords, POPBRIDGE_DATA_DIR=str(tmp_path / "data"))
    log_file = tmp_path / "fetcher.log"
    counts: Counter[tuple[str, str]] = Counter()

    async def published(expected: int) -> bool:
        counts.clear()
        counts.update((e.mailbox_id, e.uidl) for e in await stage.published())
        return len(counts) >= expected

    for round_, expected in ((1, 6), (2, 9)):
        with log_file.open("ab") as output:
            process = await asyncio.create_subprocess_exec(
                POPBRIDGE, "fetcher", "--config", str(config), env=env, stdout=output, stderr=output
            )
        try:
            async with asyncio.timeout(60):
                while not await published(expected):  # noqa: ASYNC110 - another process publishes
                    await asyncio.sleep(0.3)
        finally:
            process.send_signal(signal.SIGKILL)  # no graceful stop: whatever is on disk is what is there
            await process.wait()
        if round_ == 1:
            for n, user in enumerate(users):
                dovecot.deliver(user, message(n, 3))
    first, restart = records_read_at_starts(log_file)
    assert first == HISTORY  # an empty store: the whole topic once
    # The store survived the kill: only what was written since its checkpoint, at most the 6 records of the
    # first run (a gained mailbox's catch-up may have moved the checkpoint past some), never the history.
    assert restart <= 6
    assert [pair for pair, times in counts.items() if times > 1] == []  # keep mode: memory restored


@dataclass
class GatedProxy:
    """A loopback proxy to Dovecot that holds each connection until `limit` POP3 sessions are open at
    once (or every `expected` one arrived), then forwards them; `peak` is the most sessions ever open at
    once. A session counts from its connection to its QUIT: the proxy sees QUIT before the fetcher gets
    the reply, so before the pass ends and frees its slot for the next one.

    With the bound working, every release happens with exactly `limit` open, so `peak == limit`; without
    it, every pass connects at once and `peak` exceeds it."""

    target_port: int
    limit: int
    expected: int
    port: int = 0
    open: int = 0
    accepted: int = 0
    peak: int = 0
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.accepted += 1
        self.peak = max(self.peak, self.open)
        session = _Session(self)
        try:
            if self.open >= self.limit or self.accepted >= self.expected:
                self._release.set()
            await self._release.wait()
            self._release.clear()  # the next connections wait for the next full set
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            pumps = [
                asyncio.create_task(_pump(reader, up_writer, session)),
                asyncio.create_task(_pump(up_reader, writer, None)),
            ]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in pumps:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await task
            up_writer.transport.abort()
        finally:
            writer.transport.abort()
            session.ended()


@dataclass
class _Session:
    proxy: GatedProxy
    done: bool = False

    def ended(self) -> None:
        if not self.done:
            self.done = True
            self.proxy.open -= 1


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: _Session | None) -> None:
    while data := await reader.read(65536):
        if session is not None and re.search(rb"(^|\n)QUIT\r\n", data):
            session.ended()
        writer.write(data)
        await writer.drain()


async def test_no_more_than_max_parallel_mailboxes_pop3_sessions_run_at_once(
    kafka_bootstrap: str, kafka_topic_prefix: str, dovecot: DovecotMailboxes
) -> None:
    stage = FetcherStage(kafka_bootstrap, kafka_topic_prefix)
    await stage.create_topics()
    users = [dovecot.new_user(f"par{n}") for n in range(24)]
    for n, user in enumerate(users):
        dovecot.deliver(user, message(n, 1))
    proxy = GatedProxy(dovecot.server.pop3_port, limit=4, expected=len(users))
    server = await asyncio.start_server(proxy.accept, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    boxes = [
        dovecot_mailbox(dovecot, user, f"par{n}", mode="keep", port=proxy.port, max_connections_per_host=50)
        for n, user in enumerate(users)
    ]
    try:
        async with stage.fetcher({f"PW_par{n}": u.password for n, u in enumerate(users)},
                                 max_parallel_mailboxes=4) as fetcher:  # fmt: skip
            results = await fetcher.poll_all(boxes)
    finally:
        server.close()
        await server.wait_closed()
    assert [r.error for r in results] == [None] * len(users)
    assert sum(r.published for r in results) == len(users)
    assert proxy.peak == 4
