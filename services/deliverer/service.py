"""The deliverer's wiring: routed messages in, one copy per recipient out over SMTP/LMTP, outcomes on the log.

One loop with one consumer (group `deliverer`) reads the routed topic and every retry tier
(`retry-1..5`), which are co-partitioned with the delivered ledger: the same key (fetch id), the same
partition count (checked at start, `check_co_partitioned`) and the range assignor, so partition N of
each belongs to one replica and every record of a pair is handled there, one batch at a time. Every
routed message gets a first attempt straight away; a tier's records fall due in the order they were
written, so when the head of a tier partition is not due the loop pauses that partition at its head and
resumes it when due. Nothing waits behind a deferred message but later retries of the same tier.

The ledger (services.deliverer.ledger) is a store on disk per owned partition: restored from its
changelog (the ledger topic) before the first record of a gained partition is handled, and written by
this replica, synchronously, for each copy delivered, before the batch commits.

Kafka trouble never ends the stage (services.runtime.kafka_faults): a consumer that fails is reopened
with backoff (`_keep_going`), a publish that fails is sent again until durable, and a rebalance finishes
or abandons the batch in hand and commits it before the partitions move (services.deliverer.handover).
Only a permanent error (a refused login, a missing topic, topics not co-partitioned, a full disk under
the state store) ends `run`, as that LogError.

For each batch: drop the pairs already delivered (or in flight in this process), attempt the rest
concurrently (the transport bounds the connections), publish every DeliveryAttempted, ledger entry,
retry and dead letter, and only once that is durable (and the ledger entries in the store) commit the
offsets. `until_idle` means: the routed topic is read to its end and no retry is due now; retries due
later stay on their tier topics for the next run.

With `postmaster` set (`notify_postmaster`), each copy that became a dead letter is reported to the
postmaster in one short notice, sent once the dead letter is durable; a notice that fails is logged only.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

from schemas.codec import encode
from schemas.events import DeliveryDeadLettered, RecipientsResolved, RetryScheduled
from schemas.topics import DEAD_LETTERS, DELIVERED, DELIVERY_ATTEMPTS, RETRY_TOPICS, ROUTED, topic_spec
from services.deliverer.envelope import mail_from
from services.deliverer.handover import Handover
from services.deliverer.ledger import Ledger, check_co_partitioned, decode_record, ledger_key
from services.deliverer.notice import postmaster_notice
from services.deliverer.outcome import Verdict
from services.deliverer.retry import Followups, Job, RetryPolicy, followups
from services.deliverer.store import STATE_FILE, LedgerStore, open_store
from services.deliverer.trace import line_ending_of, received_field, with_trace
from services.runtime.broker_wait import Backoff, sleep_or_stop
from services.runtime.embedded import EmbeddedLog
from services.runtime.health import ProgressTracker
from services.runtime.log import (
    Log,
    LogConsumer,
    LogError,
    LogProducer,
    Outgoing,
    Record,
    TopicPartition,
    Written,
    next_offsets,
)
from services.runtime.metrics import Metrics
from services.runtime.outage import BROKER
from services.runtime.settings import DeploymentSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")

Item = tuple[Record, "Job | None"]
"""A record read and the job it holds (None for a record that is not a valid event: it is skipped)."""
Head = tuple[int, datetime]
"""The offset of the first record of a tier partition that is not due, and when it is."""


class Transport(Protocol):
    """Hands one message to the destination server (services.deliverer.smtp.SmtpTransport)."""

    @property
    def server(self) -> str:
        """host:port, recorded in every DeliveryAttempted."""
        ...

    async def deliver(self, sender: str, recipients: Sequence[str], message: bytes) -> dict[str, Verdict]:
        """One verdict per recipient; raises only for bugs (network and server trouble are verdicts)."""
        ...


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True)
class Topics:
    """The deployment's names of the topics the deliverer reads and writes."""

    routed: str
    attempts: str
    dead_letters: str
    delivered: str
    retries: tuple[str, ...]

    def all(self) -> list[str]:
        return [self.routed, self.attempts, self.dead_letters, self.delivered, *self.retries]

    def co_partitioned(self) -> list[str]:
        """The topics whose partition N must hold the same fetch ids: one owner per pair."""
        return [self.routed, *self.retries, self.delivered]

    @classmethod
    def of(cls, settings: DeploymentSettings) -> Topics:
        return cls(settings.topic(ROUTED), settings.topic(DELIVERY_ATTEMPTS), settings.topic(DEAD_LETTERS),
                   settings.topic(DELIVERED), tuple(settings.topic(t) for t in RETRY_TOPICS))


@dataclass
class Counts:
    """What one run did, per recipient copy."""

    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    skipped: int = 0

    def add(self, result: Followups) -> None:
        for attempt in result.attempted:
            setattr(self, attempt.outcome, getattr(self, attempt.outcome) + 1)


@dataclass
class Deliverer:
    """The deliverer stage; `run` is its loop."""

    log: Log
    settings: DeploymentSettings
    transport: Transport
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    clock: Clock = field(default_factory=SystemClock)
    trace_by: str = "popbridge"
    batch_size: int = 64
    poll_seconds: float = 0.5
    counts: Counts = field(default_factory=Counts)
    metrics: Metrics | None = None
    postmaster: str | None = None
    """Where dead-letter notices go; None sends none."""
    tracker: ProgressTracker | None = None
    """Told of each attempt started and finished and each batch committed (liveness)."""
    state_path: Path | None = None
    """The state store's file (services.deliverer.store); None: the embedded log's own file in embedded
    mode, else a throwaway one (the ledger is then restored from the changelog at each start)."""
    retention_ms: int = int(topic_spec(DELIVERED).config["retention.ms"])
    """How long the store keeps a pair: the ledger topic's retention."""

    def __post_init__(self) -> None:
        self.topics = Topics.of(self.settings)
        self._in_flight: set[tuple[str, str]] = set()
        self._stop = asyncio.Event()

    async def run(self, *, until_idle: bool = False, stop: asyncio.Event | None = None) -> Counts:
        """Deliver until `stop` is set or, with `until_idle`, until nothing is left to do now."""
        self._stop = stop = stop or asyncio.Event()
        await self._keep_going("start", partial(self._run, until_idle, stop), stop)
        return self.counts

    async def _run(self, until_idle: bool, stop: asyncio.Event) -> None:
        """Check the co-partitioning, open the state store and run the loop; a failure to connect is
        retried by `run`."""
        await check_co_partitioned(self.log, self.topics.co_partitioned())
        with self._opened_store() as store:
            self._ledger = Ledger(self.log, store, retention_ms=self.retention_ms, now_ms=self._now_ms)
            async with self.log.producer() as producer:
                self._producer: LogProducer = producer
                await self._keep_going("deliver", partial(self._pass, until_idle, stop), stop)

    @contextmanager
    def _opened_store(self) -> Iterator[LedgerStore]:
        """The store at `state_path`; in embedded mode the log's own file; else a throwaway directory (a
        replica with no local state, restored from the changelog: what tests and benches use)."""
        with tempfile.TemporaryDirectory(prefix="popbridge-deliverer-") as scratch:
            if self.state_path is not None:
                store = open_store(self.state_path, self.topics.delivered)
            elif isinstance(self.log, EmbeddedLog):
                store = open_store(self.log.path, self.topics.delivered, dedicated=False)
            else:
                store = open_store(Path(scratch) / STATE_FILE, self.topics.delivered)
            try:
                yield store
            finally:
                store.close()

    async def _keep_going(self, name: str, work: Callable[[], Awaitable[T]], stop: asyncio.Event) -> T | None:
        """Run `work` until it returns; a recoverable log error is one line (within the outage bound), a
        backoff and another go (a consumer reopened rejoins its group). None when `stop` came first."""
        backoff = Backoff()
        while not stop.is_set():
            try:
                return await work()
            except LogError as exc:
                if not exc.retriable:
                    raise
                BROKER.failed(f"deliverer {name}: {exc}: trying again")
            if await sleep_or_stop(backoff.next(), stop):
                break
        return None

    async def _pass(self, until_idle: bool, stop: asyncio.Event) -> None:
        """One consumer on the routed topic and every retry tier, co-partitioned: a pair's records all
        come to this replica while it owns the pair's partition, and are handled one batch at a time.

        A tier partition whose head is not due is paused at its head (the records behind it are later
        still: one tier, one delay) and resumed once due; nothing else waits for it."""
        handover = Handover("deliverer")
        held: dict[TopicPartition, datetime] = {}
        # A new consumer owns nothing yet: what an earlier one owned may have had another owner since.
        self._ledger.release(self._ledger.owned)

        async def revoked(tps: set[TopicPartition]) -> None:
            await handover.revoked(tps)
            self._ledger.release({tp.partition for tp in tps})
            for tp in tps:
                held.pop(tp, None)

        group, topics = self.settings.group("deliverer"), [self.topics.routed, *self.topics.retries]
        async with self.log.consumer(group, topics, on_revoked=revoked, co_partitioned=True) as consumer:
            handover.consumer = consumer
            idle = False
            while not stop.is_set():
                await self._resume_due(consumer, held)
                with _slow("fetch"):
                    records = handover.owned(await self._fetch(consumer, held if idle else {}))
                # Restore before handling: a partition gained in this fetch is read from its changelog first.
                with _slow("ledger restore"):
                    await self._ledger.own({tp.partition for tp in consumer.assignment()})
                owned = self._ledger.owned
                records = [r for r in handover.owned(records) if r.partition in owned]  # none moved meanwhile
                idle = not records
                if records:
                    due = await self._hold_not_due(consumer, records, held)
                    offsets = next_offsets([record for record, _ in due])
                    with _slow(f"batch of {len(due)} records (attempts, publish, commit)"):
                        await handover.run(offsets, partial(self._handle, due))
                    self._progressed()
                elif until_idle and await consumer.caught_up(ignoring=held.keys()):
                    return

    async def _fetch(self, consumer: LogConsumer, held: dict[TopicPartition, datetime]) -> list[Record]:
        """The next records. While idle with a tier held, the clock sleeps towards the earliest due time
        beside the fetch (the system clock just waits; a test's clock jumps there)."""
        if not held:
            return await consumer.fetch(self.poll_seconds, self.batch_size)
        seconds = (min(held.values()) - self.clock.now()).total_seconds()
        sleeping = asyncio.ensure_future(self.clock.sleep(max(0.0, seconds)))
        try:
            return await consumer.fetch(self.poll_seconds, self.batch_size)
        finally:
            sleeping.cancel()

    async def _resume_due(self, consumer: LogConsumer, held: dict[TopicPartition, datetime]) -> None:
        now = self.clock.now()
        due = {tp for tp, when in held.items() if when <= now}
        if due:
            await consumer.resume(due)
            for tp in due:
                del held[tp]

    async def _hold_not_due(
        self, consumer: LogConsumer, records: Sequence[Record], held: dict[TopicPartition, datetime]
    ) -> list[Item]:
        """The records to handle now; a tier partition whose next record is not due is paused at it."""
        due, waiting = self._split_due(records)
        for tp, (offset, when) in waiting.items():
            await consumer.pause_at(tp, offset)
            held[tp] = when
        return due

    def owned_partitions(self) -> set[int]:
        """The partitions whose pairs this replica handles now (its ledger's, restored)."""
        ledger: Ledger | None = getattr(self, "_ledger", None)
        return ledger.owned if ledger is not None else set()

    def _progressed(self) -> None:
        if self.tracker is not None:
            self.tracker.progressed()

    def _split_due(self, records: Sequence[Record]) -> tuple[list[Item], dict[TopicPartition, Head]]:
        """The records that are due, in order per partition (every routed record is), and per tier
        partition whose head is not due, that head's offset and due time."""
        now = self.clock.now()
        due: list[Item] = []
        waiting: dict[TopicPartition, Head] = {}
        for record in records:
            if record.tp in waiting:
                continue
            if record.topic == self.topics.routed:
                due.append((record, _first_job(record)))
                continue
            job = _retry_job(record)
            if job is not None and job[1] > now:
                waiting[record.tp] = (record.offset, job[1])
            else:
                due.append((record, job[0] if job else None))
        return due, waiting

    async def _handle(self, items: Sequence[Item]) -> None:
        """Attempt every job, publish all that follows, and return once that is durable."""
        if not items:
            return
        if self.metrics is not None:
            self.metrics.skipped("deliverer", sum(job is None for _, job in items))
        claimed = [(record.partition, self._claim(job)) for record, job in items if job is not None]
        jobs = [(partition, job) for partition, job in claimed if job is not None]
        publishes: list[float] = []  # seconds each job's outcomes took to publish
        try:
            results = await asyncio.gather(*(self._attempt_and_record(job, p, publishes) for p, job in jobs))
        finally:
            for _, job in jobs:
                self._in_flight.difference_update((job.routed.fetch_id, r) for r in job.recipients)
            line = slow_publishes(publishes)
            if line is not None:
                logger.info("%s", line)
        for result in results:
            self.counts.add(result)
            self._observe(result)
        await self._notify([dead for result in results for dead in result.dead])

    async def _attempt_and_record(self, job: Job, partition: int, publishes: list[float]) -> Followups:
        """One job's attempt, and what follows it made durable at once, not with the rest of the batch:
        a copy the server accepted reaches the ledger milliseconds later, so a kill of this process
        sends again only the copies whose SMTP transaction (or ledger write) was under way, never every
        copy the batch had delivered before (seen in the chaos suite: one kill, 30 copies twice).
        `partition`: the pair's partition, of the record the job came from; its ledger entry and its
        retry go to that partition of their topics (co-partitioned), and the store has the entry before
        the batch commits. `publishes` gets the seconds the publish took (one line per batch says the slow
        ones: services.deliverer.service.slow_publishes)."""
        try:
            result = await self._attempt(job)
            started = time.monotonic()
            written = await self._publish(self._outgoing(result, partition))
            publishes.append(time.monotonic() - started)
            ledger = [w for w in written if w.topic == self.topics.delivered]
            self._ledger.record(partition, result.delivered, ledger)
            return result
        finally:
            # Released with its own outcome, not at the end of the batch: a retry of the pair must not
            # find it in flight (it would be skipped and committed past: a loss).
            self._in_flight.difference_update((job.routed.fetch_id, r) for r in job.recipients)

    async def _publish(self, records: list[Outgoing]) -> list[Written]:
        """Make what followed the attempts durable, sending again while the broker is away: the copies
        went out already, and their ledger entries are what keeps a redelivery from sending them twice.
        Gives up (raises) only on a permanent error, or when the stage is stopping."""
        backoff = Backoff()
        while True:
            try:
                return await self._producer.send_all(records)
            except LogError as exc:
                if not exc.retriable or self._stop.is_set():
                    raise
                BROKER.failed(f"deliverer: publishing {len(records)} outcomes: {exc}: sending again")
            await sleep_or_stop(backoff.next(), self._stop)

    async def _notify(self, dead: Sequence[DeliveryDeadLettered]) -> None:
        """One notice per dead-lettered copy to the postmaster (never to the outside sender)."""
        if self.postmaster is not None and dead:
            await asyncio.gather(*(self._send_notice(letter, self.postmaster) for letter in dead))

    async def _send_notice(self, dead: DeliveryDeadLettered, postmaster: str) -> None:
        """Null sender, so nothing answers it; a failure is logged, never retried or dead-lettered."""
        notice = postmaster_notice(dead, postmaster=postmaster, now=self.clock.now())
        verdict = (await self.transport.deliver("", [postmaster], notice))[postmaster]
        fetch_id = dead.routed.fetch_id
        if verdict.outcome == "delivered":
            logger.info("fetch %s to %s: dead letter reported to %s", fetch_id, dead.recipient, postmaster)
        else:
            logger.error("fetch %s to %s: the dead letter notice to %s was not delivered (%s): %s %s",
                         fetch_id, dead.recipient, postmaster, verdict.outcome, verdict.smtp_code or "",
                         verdict.text)

    def _observe(self, result: Followups) -> None:
        if self.metrics is None:
            return
        for attempted in result.attempted:
            self.metrics.delivery(attempted.outcome)
        self.metrics.dead_letters.inc(len(result.dead))

    def _claim(self, job: Job) -> Job | None:
        """The job narrowed to the pairs neither delivered nor in flight, which it then holds."""
        fetch_id = job.routed.fetch_id
        fresh = tuple(r for r in job.recipients
                      if not self._ledger.delivered(fetch_id, r) and (fetch_id, r) not in self._in_flight)
        if len(fresh) < len(job.recipients):
            self.counts.skipped += len(job.recipients) - len(fresh)
            logger.info("fetch %s: skipped %d copies already delivered or in flight",
                        fetch_id, len(job.recipients) - len(fresh))
        self._in_flight.update((fetch_id, r) for r in fresh)
        if not fresh:
            return None
        return Job(routed=job.routed, recipients=fresh, attempts=job.attempts, age_from=job.age_from)

    async def _attempt(self, job: Job) -> Followups:
        routed = job.routed
        trace = received_field(
            pop3_host=routed.pop3_host, fetch_id=routed.fetch_id, at=self.clock.now(),
            recipient=job.recipients[0] if len(job.recipients) == 1 else None, by=self.trace_by,
            line_ending=line_ending_of(routed.raw),
        )
        started = time.perf_counter()
        with self._attempting():
            verdicts = await self.transport.deliver(mail_from(routed.envelope_sender), job.recipients,
                                                    with_trace(routed.raw, trace))
        if self.metrics is not None:
            outcomes = (verdict.outcome for verdict in verdicts.values())
            self.metrics.smtp_transaction(time.perf_counter() - started, outcomes)
        result = followups(job, verdicts, now=self.clock.now(), policy=self.policy,
                           server=self.transport.server)
        for attempted in result.attempted:
            logger.info("fetch %s to %s: %s (attempt %d) %s %s", attempted.fetch_id, attempted.recipient,
                        attempted.outcome, attempted.attempt, attempted.smtp_code or "", attempted.smtp_text)
        return result

    def _attempting(self) -> AbstractContextManager[None]:
        """Liveness: an attempt in flight is progress (a 50 MB mail over a slow link is not a stall; the
        SMTP timeouts bound each attempt)."""
        return self.tracker.working() if self.tracker is not None else nullcontext()

    def _outgoing(self, result: Followups, partition: int) -> list[Outgoing]:
        topics = self.topics
        out = [Outgoing(topics.attempts, encode(a), a.fetch_id.encode()) for a in result.attempted]
        out += [Outgoing(topics.delivered, encode(d), ledger_key(d.fetch_id, d.recipient), partition)
                for d in result.delivered]
        out += [Outgoing(topics.dead_letters, encode(d), d.routed.fetch_id.encode()) for d in result.dead]
        if result.retry is not None:
            retry, topic = result.retry, topics.retries[result.retry_tier]
            out.append(Outgoing(topic, encode(retry), retry.routed.fetch_id.encode(), partition))
        return out

    def _now_ms(self) -> int:
        return int(self.clock.now().timestamp() * 1000)


SLOW_STEP_SECONDS = 5.0
"""A step of the loop that takes longer is logged: while it runs this replica handles nothing else, and a
rebalance waits for its batch (services.deliverer.handover)."""


def slow_publishes(took: Sequence[float]) -> str | None:
    """One line for the jobs of a batch whose outcomes took SLOW_STEP_SECONDS or more to publish (the broker
    slow or away), or None: all the jobs of a batch publish at once, and a line each was a flood."""
    slow = sorted(t for t in took if t >= SLOW_STEP_SECONDS)
    if not slow:
        return None
    return (f"deliverer: publishing the outcomes of {len(slow)} of {len(took)} jobs took "
            f"{slow[0]:.1f}-{slow[-1]:.1f} s")


@contextmanager
def _slow(step: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        took = time.monotonic() - started
        if took >= SLOW_STEP_SECONDS:
            logger.info("deliverer: %s took %.1f s", step, took)


def _first_job(record: Record) -> Job | None:
    routed = decode_record(record, RecipientsResolved)
    return None if routed is None else Job.first(routed)


def _retry_job(record: Record) -> tuple[Job, datetime] | None:
    retry = decode_record(record, RetryScheduled)
    return None if retry is None else (Job.again(retry), retry.due_at)
