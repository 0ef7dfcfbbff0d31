"""The deliverer's state on a real broker: the ledger store restored after a kill and after a rebalance,
the co-partitioning check, and the duplicate the chaos runs found when two records of one pair went to two
replicas (issue 13)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from schemas.codec import encode
from schemas.events import RecipientsResolved, RetryScheduled
from schemas.topics import RETRY_TOPICS, ROUTED, TOPICS, TopicSpec
from services.deliverer.ledger import CoPartitionError
from services.deliverer.outcome import Verdict
from services.deliverer.retry import Job, RetryPolicy
from services.deliverer.service import Deliverer
from services.runtime.embedded import EmbeddedLog
from services.runtime.kafka import KafkaLog
from services.runtime.log import Outgoing
from services.runtime.settings import DeploymentSettings
from tests.support.deliverer import START, FakeClock, deployment, publish, routed_event

pytestmark = pytest.mark.integration

RESTORED = re.compile(r"partitions \[[\d, ]*\] restored, (\d+) changelog records applied")


class Recording:
    """A destination that accepts every copy and counts them per recipient. With `barrier` set, every copy
    waits (at most 20 s) until that many copies are in the server at once: the copies a batch start
    together are all under way before any finishes, as on a busy server."""

    server = "recording.test:25"

    def __init__(self, barrier: int = 0) -> None:
        self.copies: Counter[str] = Counter()
        self.barrier = barrier
        self.inside = 0
        self.full = asyncio.Event()

    async def deliver(self, sender: str, recipients: Sequence[str], message: bytes) -> dict[str, Verdict]:
        self.inside += 1
        if self.inside >= self.barrier:
            self.full.set()
        if self.barrier:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.full.wait(), 20)
        self.copies.update(recipients)
        return dict.fromkeys(recipients, Verdict("delivered", 250, "2.0.0", "ok"))


def restored_counts(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [int(m.group(1)) for r in caplog.records if (m := RESTORED.search(r.getMessage()))]


@asynccontextmanager
async def running(stage: Deliverer) -> AsyncIterator[asyncio.Task[object]]:
    stop = asyncio.Event()
    task: asyncio.Task[object] = asyncio.create_task(stage.run(stop=stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait({task}, timeout=60)
    assert task.done()
    assert task.exception() is None


async def until(condition: Callable[[], object], what: str, timeout: float = 90.0) -> None:
    """Wait for `condition()`, checked every 0.1 s: the stages' counts and ownership move inside their own
    tasks, which signal nothing a test could await (the deliverer has no hook for them)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110  # no event to await, see above
            await asyncio.sleep(0.1)
    assert condition(), what


def lose_volume(state: Path) -> None:
    """The store's files gone, as with a new pod's empty volume."""
    for leftover in state.parent.glob(state.name + "*"):
        leftover.unlink()


@pytest.fixture
def restore_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="services.deliverer.ledger")
    return caplog


async def test_a_killed_deliverer_restarts_from_its_store_and_sends_no_copy_twice(
    kafka_bootstrap: str, kafka_topic_prefix: str, tmp_path: Path, restore_log: pytest.LogCaptureFixture
) -> None:
    settings, log = await deployment(kafka_bootstrap, kafka_topic_prefix)
    events = [routed_event(f"u{i}", [f"r{i}@example.com"]) for i in range(20)]
    await publish(log, settings, *events)
    transport, state = Recording(), tmp_path / "state" / "ledger.sqlite3"
    first = asyncio.create_task(Deliverer(log, settings, transport, poll_seconds=0.2, batch_size=1,
                                          state_path=state).run())
    await until(lambda: sum(transport.copies.values()) == 20, "the first 20 copies")
    first.cancel()  # no stop, no clean close of the store: as after a kill
    await asyncio.wait({first})
    await publish(log, settings, *events, routed_event("new", ["new@example.com"]))  # a router replay
    restore_log.clear()
    counts = await Deliverer(log, settings, transport, poll_seconds=0.2, batch_size=1,
                             state_path=state).run(until_idle=True)
    assert transport.copies == Counter({**{f"r{i}@example.com": 1 for i in range(20)}, "new@example.com": 1})
    # The 20 replayed copies, plus the last record of the first run when the kill came between its copy
    # and its offset commit (batches of one: at most one such record); the store skips it too.
    assert 20 <= counts.skipped <= 21
    # Its own ledger writes moved the checkpoint: the restart read no changelog record, not 20.
    assert sum(restored_counts(restore_log)) == 0


async def test_a_replica_with_no_local_state_restores_its_partitions_from_the_changelog(
    kafka_bootstrap: str, kafka_topic_prefix: str, tmp_path: Path, restore_log: pytest.LogCaptureFixture
) -> None:
    settings, log = await deployment(kafka_bootstrap, kafka_topic_prefix)
    events = [routed_event(f"u{i}", [f"r{i}@example.com"]) for i in range(12)]
    await publish(log, settings, *events)
    transport = Recording()
    await Deliverer(log, settings, transport, state_path=tmp_path / "a.sqlite3").run(until_idle=True)
    lose_volume(tmp_path / "a.sqlite3")
    await publish(log, settings, *events)
    restore_log.clear()
    counts = await Deliverer(log, settings, transport, state_path=tmp_path / "a.sqlite3").run(until_idle=True)
    assert counts.skipped == 12
    assert max(transport.copies.values()) == 1
    assert sum(restored_counts(restore_log)) == 12


async def test_a_rebalance_moves_partitions_with_their_state(
    kafka_bootstrap: str, kafka_topic_prefix: str, tmp_path: Path, restore_log: pytest.LogCaptureFixture
) -> None:
    settings, log = await deployment(kafka_bootstrap, kafka_topic_prefix)
    events = [routed_event(f"u{i}", [f"r{i}@example.com"]) for i in range(36)]
    await publish(log, settings, *events)
    transport = Recording()
    a = Deliverer(log, settings, transport, poll_seconds=0.2, state_path=tmp_path / "a.sqlite3")
    b = Deliverer(log, settings, transport, poll_seconds=0.2, state_path=tmp_path / "b.sqlite3")
    async with running(a):
        await until(lambda: sum(transport.copies.values()) == 36, "replica a delivered everything")
        async with running(b):
            await until(lambda: b.owned_partitions() and len(a.owned_partitions()) < 12, "b owns partitions")
            moved = b.owned_partitions()
            assert not moved & a.owned_partitions()
            await publish(log, settings, *events)  # replayed: each copy must be found in its owner's state
            await until(lambda: a.counts.skipped + b.counts.skipped == 36, "the replay skipped")
    assert max(transport.copies.values()) == 1
    assert b.counts.skipped > 0  # b skipped copies a delivered: it restored their partitions
    assert sum(restored_counts(restore_log)) >= b.counts.skipped


async def test_topics_not_co_partitioned_stop_the_deliverer_with_one_line(
    kafka_bootstrap: str, kafka_topic_prefix: str
) -> None:
    log = KafkaLog(kafka_bootstrap)
    specs = [TopicSpec(kafka_topic_prefix + spec.name, 3 if spec.name == RETRY_TOPICS[1] else spec.partitions,
                       spec.config) for spec in TOPICS]
    await log.ensure_topics(specs)
    settings = DeploymentSettings(kafka_bootstrap=kafka_bootstrap, topic_prefix=kafka_topic_prefix,
                                  group_prefix=kafka_topic_prefix + "g")
    with pytest.raises(CoPartitionError) as raised:
        await Deliverer(log, settings, Recording()).run(until_idle=True)
    message = str(raised.value)
    assert "\n" not in message
    assert "retry-2 3" in message
    assert "not co-partitioned" in message


async def test_two_records_of_one_pair_on_two_replicas_deliver_one_copy(
    kafka_bootstrap: str, kafka_topic_prefix: str
) -> None:
    # Chaos seed 14 (issue 13): the router routed one fetch twice (same fetch id, 2 s apart). The first
    # routed record was deferred (the connection dropped after DATA), so its retry waited in retry-1;
    # the second routed record (replica 1, routed group) and the retry (replica 2, retry-1 group) were
    # attempted 0.3 s apart, each replica's ledger not yet holding the other's entry: the copy was
    # accepted twice. Here each of 12 pairs has a routed record and a retry due now, two replicas run,
    # and every copy in a batch is held until all 12 are under way, so whatever two replicas claim
    # concurrently is sent twice.
    settings, log = await deployment(kafka_bootstrap, kafka_topic_prefix)
    transport, clock = Recording(barrier=12), FakeClock()
    stages = [Deliverer(log, settings, transport, clock=clock, poll_seconds=0.2,
                        policy=RetryPolicy(delays=(0.0,))) for _ in range(2)]
    async with running(stages[0]), running(stages[1]):
        await until_members(log, settings, 2)
        routed = [routed_event(f"u{i}", [f"pair{i}@example.com"]) for i in range(12)]
        retries = [retry_of(event) for event in routed]
        async with log.producer() as producer:  # both records of each pair at once
            await producer.send_all(
                [Outgoing(settings.topic(ROUTED), encode(e), e.fetch_id.encode()) for e in routed]
                + [Outgoing(settings.topic(RETRY_TOPICS[0]), encode(r), r.routed.fetch_id.encode())
                   for r in retries]
            )
        await until(lambda: len(transport.copies) == 12 and transport.full.is_set(), "every pair tried")
        await until(lambda: sum(s.counts.skipped for s in stages) + sum(transport.copies.values()) >= 24,
                    "both records of every pair handled")
    assert transport.copies == Counter({f"pair{i}@example.com": 1 for i in range(12)})


def retry_of(event: RecipientsResolved) -> RetryScheduled:
    job = Job.first(event)
    return RetryScheduled(routed=job.routed, recipients=job.recipients, attempts=1, due_at=START,
                          age_from=START)


async def until_members(log: KafkaLog, settings: DeploymentSettings, count: int) -> None:
    """Until every deliverer consumer group with members has `count` of them (the routed group at least)."""
    groups = [settings.group("deliverer"), settings.group("deliverer-retry-1")]
    async with asyncio.timeout(90):
        while True:
            members = [len(await log.active_members(group)) for group in groups]
            if members[0] == count and all(m in (0, count) for m in members):
                return
            await asyncio.sleep(0.2)


async def test_in_embedded_mode_the_ledger_is_a_table_of_the_log_file(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path)
    settings = DeploymentSettings(data_dir=str(tmp_path))
    await log.ensure_topics(list(TOPICS))
    events = [routed_event(f"u{i}", [f"r{i}@example.com"]) for i in range(5)]
    await publish(log, settings, *events)
    transport = Recording()
    await Deliverer(log, settings, transport).run(until_idle=True)
    await publish(log, settings, *events)  # replayed: found in the table, one pair at a time
    counts = await Deliverer(log, settings, transport).run(until_idle=True)
    assert counts.skipped == 5
    assert max(transport.copies.values()) == 1
    assert ledger_rows(log.path) == {(e.fetch_id, f"r{i}@example.com") for i, e in enumerate(events)}


def ledger_rows(path: Path) -> set[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return set(conn.execute("SELECT fetch_id, recipient FROM deliverer_ledger"))
