"""The deliverer's wiring: routed messages in, one copy per recipient out over SMTP/LMTP, outcomes on the log.

Loops, each with its own consumer group, all stopping on `stop` or, with `until_idle`, once idle:
- the routed topic (`deliverer`): every routed message gets a first attempt straight away;
- one loop per retry tier (`deliverer-retry-N`): a tier's records fall due in the order they were written,
  so when the head of a partition is not due the loop commits what it did, closes its consumer and sleeps
  until then (reopening re-reads from the head). Nothing waits behind a deferred message but later
  retries of the same tier, which are not due either.

Kafka trouble never ends the stage (services.runtime.kafka_faults): a loop whose consumer fails reopens it
with backoff (`_keep_going`), a publish that fails is sent again until durable, and a rebalance finishes
or abandons the batch in hand and commits it before the partitions move (services.deliverer.handover).
Only a permanent log error (a refused login, a missing topic) ends `run`, as that LogError.

For each batch: catch up with the delivered ledger, drop the pairs already delivered (or in flight in
this process), attempt the rest concurrently (the transport bounds the connections), publish every
DeliveryAttempted, ledger entry, retry and dead letter, and only once that is durable commit the offsets.
`until_idle` means: the routed topic is read to its end and no retry is due now; retries due later stay
on their tier topics for the next run.

With `postmaster` set (`notify_postmaster`), each copy that became a dead letter is reported to the
postmaster in one short notice, sent once the dead letter is durable; a notice that fails is logged only.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Protocol, TypeVar

from schemas.codec import encode
from schemas.events import DeliveryDeadLettered, RecipientsResolved, RetryScheduled
from schemas.topics import DEAD_LETTERS, DELIVERED, DELIVERY_ATTEMPTS, RETRY_TOPICS, ROUTED
from services.deliverer.envelope import mail_from
from services.deliverer.handover import Handover
from services.deliverer.ledger import Ledger, decode_record, ledger_key
from services.deliverer.notice import postmaster_notice
from services.deliverer.outcome import Verdict
from services.deliverer.retry import Followups, Job, RetryPolicy, followups
from services.deliverer.trace import line_ending_of, received_field, with_trace
from services.runtime.broker_wait import Backoff, sleep_or_stop, unwrapped
from services.runtime.health import ProgressTracker
from services.runtime.log import Log, LogError, LogProducer, Outgoing, Record, TopicPartition, next_offsets
from services.runtime.metrics import Metrics
from services.runtime.outage import BROKER
from services.runtime.settings import DeploymentSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")

Item = tuple[Record, "Job | None"]
"""A record read and the job it holds (None for a record that is not a valid event: it is skipped)."""


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
        """Connect, read the ledger and run the loops; a failure to connect is retried by `run`."""
        ledger_group = self.settings.group(f"deliverer-ledger-{uuid.uuid4().hex[:12]}")
        async with self.log.producer() as producer, self.log.consumer(
            ledger_group, [self.topics.delivered]
        ) as ledger_consumer:
            self._producer: LogProducer = producer
            self._ledger = Ledger(ledger_consumer)
            await self._keep_going("ledger", self._ledger.catch_up, stop)
            await unwrapped(self._loops(until_idle, stop))

    async def _loops(self, until_idle: bool, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._routed_loop(until_idle, stop))
            for tier in range(len(self.topics.retries)):
                tasks.create_task(self._tier_loop(tier, until_idle, stop))

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

    async def _routed_loop(self, until_idle: bool, stop: asyncio.Event) -> None:
        await self._keep_going("routed", lambda: self._routed_pass(until_idle, stop), stop)

    async def _routed_pass(self, until_idle: bool, stop: asyncio.Event) -> None:
        handover = Handover("routed")
        group = self.settings.group("deliverer")
        async with self.log.consumer(group, [self.topics.routed], on_revoked=handover.revoked) as consumer:
            handover.consumer = consumer
            while not stop.is_set():
                records = handover.owned(await consumer.fetch(self.poll_seconds, self.batch_size))
                if records:
                    items = [(record, _first_job(record)) for record in records]
                    await handover.run(next_offsets(records), partial(self._handle, items))
                    self._progressed()
                elif until_idle and await consumer.caught_up():
                    return

    async def _tier_loop(self, tier: int, until_idle: bool, stop: asyncio.Event) -> None:
        while not stop.is_set():
            work = partial(self._tier_pass, tier, until_idle, stop)
            passed = await self._keep_going(f"retry-{tier + 1}", work, stop)
            if passed is None or passed[0] is None or until_idle:
                return
            await self._sleep_until(passed[0], stop)

    async def _tier_pass(self, tier: int, until_idle: bool, stop: asyncio.Event) -> tuple[datetime | None]:
        """Process the due records of one tier; the due time of a head that is not due yet, else None
        (in a 1-tuple, so that `_keep_going`'s None for "stopped" stays apart)."""
        group = self.settings.group(f"deliverer-retry-{tier + 1}")
        handover = Handover(f"retry-{tier + 1}")
        topics = [self.topics.retries[tier]]
        async with self.log.consumer(group, topics, on_revoked=handover.revoked) as consumer:
            handover.consumer = consumer
            while not stop.is_set():
                records = handover.owned(await consumer.fetch(self.poll_seconds, self.batch_size))
                if not records:
                    if until_idle and await consumer.caught_up():
                        return (None,)
                    continue
                due, waiting = self._split_due(records)
                await handover.run(next_offsets([record for record, _ in due]), partial(self._handle, due))
                self._progressed()
                if waiting:
                    return (min(waiting.values()),)
        return (None,)

    def _progressed(self) -> None:
        if self.tracker is not None:
            self.tracker.progressed()

    def _split_due(self, records: Sequence[Record]) -> tuple[list[Item], dict[TopicPartition, datetime]]:
        """The records that are due, in order per partition, and per partition the due time of its head."""
        now = self.clock.now()
        due: list[Item] = []
        waiting: dict[TopicPartition, datetime] = {}
        for record in records:
            if record.tp in waiting:
                continue
            job = _retry_job(record)
            if job is not None and job[1] > now:
                waiting[record.tp] = job[1]
            else:
                due.append((record, job[0] if job else None))
        return due, waiting

    async def _handle(self, items: Sequence[Item]) -> None:
        """Attempt every job, publish all that follows, and return once that is durable."""
        if not items:
            return
        await self._ledger.catch_up()
        if self.metrics is not None:
            self.metrics.skipped("deliverer", sum(job is None for _, job in items))
        jobs = [job for job in (self._claim(job) for _, job in items if job is not None) if job is not None]
        try:
            results = await asyncio.gather(*(self._attempt_and_record(job) for job in jobs))
        finally:
            for job in jobs:
                self._in_flight.difference_update((job.routed.fetch_id, r) for r in job.recipients)
        for result in results:
            self.counts.add(result)
            self._observe(result)
        await self._notify([dead for result in results for dead in result.dead])

    async def _attempt_and_record(self, job: Job) -> Followups:
        """One job's attempt, and what follows it made durable at once, not with the rest of the batch:
        a copy the server accepted reaches the ledger milliseconds later, so a kill of this process
        sends again only the copies whose SMTP transaction (or ledger write) was under way, never every
        copy the batch had delivered before (seen in the chaos suite: one kill, 30 copies twice)."""
        try:
            result = await self._attempt(job)
            await self._publish(self._outgoing(result))
            for entry in result.delivered:
                self._ledger.add(entry)
            return result
        finally:
            # Released with its own outcome, not at the end of the batch: the retry just published may
            # fall due while the batch's other jobs still run, and a tier loop of this process must not
            # take the pair for in flight then (it would skip the retry and commit past it: a loss).
            self._in_flight.difference_update((job.routed.fetch_id, r) for r in job.recipients)

    async def _publish(self, records: list[Outgoing]) -> None:
        """Make what followed the attempts durable, sending again while the broker is away: the copies
        went out already, and their ledger entries are what keeps a redelivery from sending them twice.
        Gives up (raises) only on a permanent error, or when the stage is stopping."""
        backoff = Backoff()
        while True:
            try:
                await self._producer.send_all(records)
            except LogError as exc:
                if not exc.retriable or self._stop.is_set():
                    raise
                BROKER.failed(f"deliverer: publishing {len(records)} outcomes: {exc}: sending again")
            else:
                return
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

    def _outgoing(self, result: Followups) -> list[Outgoing]:
        topics = self.topics
        out = [Outgoing(topics.attempts, encode(a), a.fetch_id.encode()) for a in result.attempted]
        out += [Outgoing(topics.delivered, encode(d), ledger_key(d.fetch_id, d.recipient))
                for d in result.delivered]
        out += [Outgoing(topics.dead_letters, encode(d), d.routed.fetch_id.encode()) for d in result.dead]
        if result.retry is not None:
            retry, topic = result.retry, topics.retries[result.retry_tier]
            out.append(Outgoing(topic, encode(retry), retry.routed.fetch_id.encode()))
        return out

    async def _sleep_until(self, when: datetime, stop: asyncio.Event) -> None:
        seconds = (when - self.clock.now()).total_seconds()
        if seconds <= 0:
            return
        sleeping = asyncio.ensure_future(self.clock.sleep(seconds))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({sleeping, stopping}, return_when=asyncio.FIRST_COMPLETED)
        sleeping.cancel()
        stopping.cancel()


def _first_job(record: Record) -> Job | None:
    routed = decode_record(record, RecipientsResolved)
    return None if routed is None else Job.first(routed)


def _retry_job(record: Record) -> tuple[Job, datetime] | None:
    retry = decode_record(record, RetryScheduled)
    return None if retry is None else (Job.again(retry), retry.due_at)
