"""The Kafka implementation of the log interface (services.runtime.log), on aiokafka.

aiokafka's defaults are weaker than Java's (acks=1, no idempotence), so the producer sets
`acks="all"` and `enable_idempotence=True` explicitly: `send` returns only after every in-sync replica
has the record. Size limits follow schemas.topics.MAX_MESSAGE_BYTES so a 50 MB mail passes end to end.

Over 500 lines because it is the one adapter to Kafka: producer, group consumer, ranged reads and admin
calls share the client options, the error wrapping and the SASL diagnosis; the error classification
(kafka_faults) and the security options (kafka_security) are modules of their own already.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import AIOKafkaConnection
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnknownMemberIdError,
    for_code,
)
from aiokafka.structs import OffsetAndMetadata

from schemas.topics import MAX_MESSAGE_BYTES, TopicSpec
from services.runtime.kafka_faults import recoverable
from services.runtime.kafka_reads import KafkaReads, record_of
from services.runtime.kafka_security import PLAINTEXT, KafkaSecurity, kafka_security
from services.runtime.log import (
    GROUP_HEARTBEAT_INTERVAL,
    GROUP_SESSION_TIMEOUT,
    REVOKE_TIMEOUT,
    LogError,
    LogRefusedError,
    OnRevoked,
    Outgoing,
    Record,
    TopicPartition,
    Written,
)
from services.runtime.outage import BROKER
from services.runtime.settings import ConfigError, DeploymentSettings

group_log = logging.getLogger("popbridge.kafka.group")
producer_log = logging.getLogger("popbridge.kafka.producer")
_SLOW_HANDOVER_SECONDS = 1.0  # a revocation listener that takes longer is logged (it holds the group)

# Room for the event framing and Kafka's record overhead on top of the largest message.
_REQUEST_BYTES = MAX_MESSAGE_BYTES + 1024 * 1024
# What a consumer fetches ahead, per partition and per fetch response. aiokafka keeps a fetched partition's
# records until they are consumed, so these bound its buffer (at _REQUEST_BYTES a consumer could hold 65 MB
# a partition: `run` on Kafka peaked at 413-427 MB). A record larger than them still comes: the broker
# (Fetch v3+, KIP-74) returns the first batch of the first non-empty partition of a response whatever its
# size, and turns a cut-off batch of a later partition into an empty answer that is asked again (aiokafka
# shuffles the partitions of each request); tests/integration/test_topics.py reads 6 MB mail so.
_PREFETCH_PARTITION_BYTES = 1024 * 1024
_PREFETCH_BYTES = 4 * 1024 * 1024
# aiokafka retries a failed connection, coordinator lookup or heartbeat every retry_backoff_ms (100 ms by
# default): with seven clients a deliverer tried (and logged) ~70 times a second while the broker was
# away. 500 ms keeps a returning broker noticed within half a second and makes a fifth of the attempts.
# aiokafka has no separate reconnect backoff; metadata is refreshed on every failed connection anyway, so
# metadata_max_age_ms (5 min) plays no part in recovering from a restart.
_RETRY_PACING = {"retry_backoff_ms": 500}
# A consumer that lives for one offset lookup or ranged read (the ops commands, lag): its first request on
# a topic finds no metadata for it yet and waits one backoff (aiokafka's StaleMetadata retry). At 500 ms
# that was most of a `popbridge trace`, which makes four or five rounds of lookups; aiokafka's default.
_LOOKUP_PACING = {"retry_backoff_ms": 100}


class KafkaLogError(LogError):
    """A Kafka operation failed; `retriable`: a stage waits it out (services.runtime.kafka_faults)."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class KafkaRefusedError(KafkaLogError, LogRefusedError):
    """The cluster refused this user (ACLs)."""


LISTED_WITHIN = 30.0  # seconds `ensure_topics` waits at most for the broker to list what it created
# Seconds a stage's start waits at most for a topic the broker does not list before calling it missing
# (a deployment mistake, which ends the stage): a broker that has just restarted may not list every topic
# yet (seen in the chaos runs: a fetcher exited for a topic that was there).
MISSING_WITHIN = 10.0


async def _listed(admin: AIOKafkaAdminClient, names: Sequence[str], *, within: float = LISTED_WITHIN) -> None:
    """Return once the broker lists every topic of `names`, or after `within` seconds. The controller
    creates a topic; the broker's metadata follows a moment later (seconds on a loaded machine), and a
    stage started right after `topics create` took the topic for missing and exited. Kafka announces the
    moment to no one, so the list is asked again."""
    deadline = asyncio.get_running_loop().time() + within
    while not set(names) <= set(await admin.list_topics()):
        if asyncio.get_running_loop().time() >= deadline:
            return
        await asyncio.sleep(0.1)


def _wrap(exc: KafkaError, doing: str) -> KafkaLogError:
    return KafkaLogError(f"kafka: {doing}: {type(exc).__name__}: {exc}", retriable=recoverable(exc))


# Seconds a producer taken out of service (KafkaProducer) may take to deliver what it still holds (other
# callers wait for those sends) before what is left fails and it is closed: an outage would otherwise
# keep it, its connections and its sender retrying, for as long as the outage lasts.
RETIRE_WITHIN = 30.0


@dataclass
class KafkaProducer:
    """LogProducer on an idempotent aiokafka producer with acks=all, replaced by a fresh one (a new
    producer id) after any failed send.

    Why: aiokafka 0.14 numbers a batch (the idempotent producer's per-partition sequence) when it leaves
    the accumulator, also when it leaves only to fail. A broker that shuts down answers "no leader" for its
    partitions; a batch to a partition without a known leader waits in the accumulator and, after
    request_timeout_ms (40 s), is failed with a sequence number the broker never saw. The next batch to that
    partition is refused with OutOfOrderSequenceNumber, which ends aiokafka's sender task: the producer
    never sends again (seen in the chaos runs as stalled stages and duplicates). A failed send may have left
    such a gap, so the producer that failed is retired and the next send opens another."""

    open: Callable[[], Awaitable[AIOKafkaProducer]]  # a started producer, or KafkaLogError
    producer: AIOKafkaProducer | None = None  # None after a failure, until the next send opens one
    _opening: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _retiring: set[asyncio.Task[None]] = field(default_factory=set, repr=False)  # at most one per failure

    async def send(self, record: Outgoing) -> Written:
        return (await self.send_all([record]))[0]

    async def send_all(self, records: Sequence[Outgoing]) -> list[Written]:
        producer = await self._current()
        try:
            futures = [await producer.send(r.topic, r.value, key=r.key, partition=r.partition)
                       for r in records]
            results = await asyncio.gather(*futures)
        except KafkaError as exc:
            self._retire(producer)
            raise _wrap(exc, "publish") from exc
        BROKER.recovered()
        return [Written(m.topic, m.partition, m.offset) for m in results]

    async def _current(self) -> AIOKafkaProducer:
        async with self._opening:  # concurrent sends after a failure share one new producer
            if self.producer is None:
                self.producer = await self.open()
            return self.producer

    def _retire(self, producer: AIOKafkaProducer) -> None:
        if self.producer is not producer:
            return  # retired already by another of its failed sends
        self.producer = None
        task = asyncio.create_task(_retired(producer))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        """Stop the producer in service (delivering what it holds) and wait for the retired ones."""
        producer, self.producer = self.producer, None
        try:
            if producer is not None:
                await producer.stop()
        finally:
            await asyncio.gather(*self._retiring, return_exceptions=True)


def fail_pending(producer: AIOKafkaProducer) -> None:
    """Fail every batch `producer` still holds, so its stop() can end. The one private aiokafka call here
    (tests/unit/runtime/test_aiokafka_seam.py fails on a release that moves it): aiokafka has no abort,
    stop() waits for every pending batch, and an idempotent batch already sent once is retried until the
    broker answers."""
    producer._message_accumulator.fail_all(KafkaConnectionError("producer retired after a failure"))


async def _retired(producer: AIOKafkaProducer) -> None:
    """Stop a producer taken out of service: what it holds has RETIRE_WITHIN seconds to be delivered, then
    fails (its callers send it again through the new producer)."""
    stopping = asyncio.ensure_future(producer.stop())
    try:
        try:
            await asyncio.wait_for(asyncio.shield(stopping), RETIRE_WITHIN)
        except TimeoutError:
            fail_pending(producer)
            await stopping
    except Exception:  # a stop that fails leaves nothing we could still deliver; the next send is elsewhere
        producer_log.debug("a retired producer failed to stop", exc_info=True)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Awaited by aiokafka's coordinator inside a rebalance: `on_partitions_revoked` before this member
    rejoins the group (so before any other member gets the partitions), `on_partitions_assigned` after.

    The protocol is eager: every rebalance revokes every partition, and assigns afresh."""

    def __init__(self, on_revoked: OnRevoked | None, group: str = "") -> None:
        self.on_revoked = on_revoked
        self.group = group
        self.revoking = False  # between a revocation and the next assignment
        self._revoked_at: float | None = None

    async def on_partitions_revoked(self, revoked: set[KafkaTopicPartition]) -> None:
        self.revoking = True
        self._revoked_at = started = time.monotonic()
        if self.on_revoked is not None and revoked:
            await self.on_revoked({TopicPartition(tp.topic, tp.partition) for tp in revoked})
        # The broker waits for this member's JoinGroup (up to the rebalance timeout) while the listener runs:
        # a slow hand-over holds every member of the group, so it is worth a line.
        took = time.monotonic() - started
        if took >= _SLOW_HANDOVER_SECONDS:
            group_log.info("group %s: rebalance: %d partitions handed over in %.1f s", self.group,
                           len(revoked), took)

    async def on_partitions_assigned(self, assigned: set[KafkaTopicPartition]) -> None:
        self.revoking = False
        if self._revoked_at is not None:
            group_log.info("group %s: rebalance: %d partitions assigned %.1f s after the revocation",
                           self.group, len(assigned), time.monotonic() - self._revoked_at)


@dataclass
class KafkaConsumer:
    """LogConsumer on an aiokafka group consumer with manual commits."""

    consumer: AIOKafkaConsumer
    rebalance: _Rebalance | None = None

    async def fetch(self, timeout: float, max_records: int = 500) -> list[Record]:
        try:
            batches = await self.consumer.getmany(timeout_ms=int(timeout * 1000), max_records=max_records)
        except KafkaError as exc:
            raise _wrap(exc, "fetch") from exc
        if batches:
            BROKER.recovered()
        return [
            Record(m.topic, m.partition, m.offset, m.key, m.value or b"", m.timestamp)
            for messages in batches.values()
            for m in messages
        ]

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if not offsets:
            return
        try:
            await self.consumer.commit(
                {
                    KafkaTopicPartition(tp.topic, tp.partition): OffsetAndMetadata(o, "")
                    for tp, o in offsets.items()
                }
            )
        except KafkaError as exc:
            raise _wrap(exc, "commit") from exc
        BROKER.recovered()

    def assignment(self) -> set[TopicPartition]:
        if self.rebalance is not None and self.rebalance.revoking:
            return set()  # aiokafka still lists the revoked partitions until the new assignment
        return {TopicPartition(tp.topic, tp.partition) for tp in self.consumer.assignment()}

    async def pause_at(self, tp: TopicPartition, offset: int) -> None:
        ktp = KafkaTopicPartition(tp.topic, tp.partition)
        try:
            self.consumer.seek(ktp, offset)
            self.consumer.pause(ktp)
        except IllegalStateError:
            pass  # no longer assigned: its next owner reads it from the committed offset

    async def resume(self, tps: Collection[TopicPartition]) -> None:
        with contextlib.suppress(IllegalStateError):  # a partition no longer assigned
            self.consumer.resume(*(KafkaTopicPartition(tp.topic, tp.partition) for tp in tps))

    async def caught_up(self, ignoring: Collection[TopicPartition] = ()) -> bool:
        assigned = self.consumer.assignment()
        if not assigned:
            return False
        skipped = {KafkaTopicPartition(tp.topic, tp.partition) for tp in ignoring}
        try:
            ends = await self.consumer.end_offsets(list(assigned))
            for tp in assigned - skipped:
                if await self.consumer.position(tp) < ends[tp]:
                    return False
        except IllegalStateError:
            return False  # a rebalance took a partition meanwhile: not caught up, fetch again
        except KafkaError as exc:
            raise _wrap(exc, "read to the end") from exc
        return True


@dataclass(frozen=True)
class KafkaLog:
    """The log on an Apache Kafka cluster."""

    bootstrap_servers: str
    client_id: str = "popbridge"
    # Off by default: mail is mostly base64 attachments that compress little, and zstd cost a third of
    # the fetcher's throughput in bench/fetch.py. Operators who pay for storage may choose "zstd".
    compression: str | None = None
    # TLS and SASL options for every client built here (services.runtime.kafka_security).
    security: KafkaSecurity = PLAINTEXT

    @classmethod
    def from_settings(cls, settings: DeploymentSettings) -> KafkaLog:
        """The log of a deployment: bootstrap, compression and security from `POPBRIDGE_KAFKA_*`.

        Reads the SASL password file and the CA file now; a ConfigError names the variable."""
        if not settings.kafka_bootstrap:
            raise ConfigError("environment: POPBRIDGE_KAFKA_BOOTSTRAP: not set")
        return cls(
            settings.kafka_bootstrap,
            compression=settings.kafka_compression,
            security=kafka_security(settings),
        )

    async def _failed(self, exc: KafkaError, doing: str) -> KafkaLogError:
        """The error to raise for `exc`. aiokafka reports a refused SASL login only as "Unable to
        bootstrap" (the reason goes to its log), so a failed SASL connection is retried once by hand to
        tell a wrong user or password from an unreachable broker."""
        if isinstance(exc, KafkaConnectionError) and self.security.sasl:
            refusal = await self._sasl_refusal()
            if refusal is not None:
                return KafkaLogError(f"kafka: {doing}: {refusal}", retriable=False)
        return _wrap(exc, doing)

    async def _sasl_refusal(self) -> str | None:
        """Why the brokers refuse our SASL login (never the password), or None when none refuses it."""
        for server in self.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            conn = AIOKafkaConnection(
                **self._client_options(bootstrap=False), host=host, port=int(port), request_timeout_ms=10_000
            )
            try:
                await conn.connect()
            except (OSError, ValueError):
                continue  # no socket was made: nothing to wait for
            except SaslAuthenticationFailed as exc:
                await _closed(conn)
                return (
                    f"SASL {self.security.mechanism} login as {self.security.username!r} refused by"
                    f" {host}:{port} ({exc}): check POPBRIDGE_KAFKA_SASL_USERNAME and the password in"
                    " POPBRIDGE_KAFKA_SASL_PASSWORD_FILE"
                )
            except KafkaError:
                await _closed(conn)
                continue
            await _closed(conn)
        return None

    def _client_options(
        self, *, bootstrap: bool = True, pacing: Mapping[str, int] = _RETRY_PACING
    ) -> dict[str, Any]:
        """What every aiokafka client of this log gets: servers, client id, TLS and SASL, retry pacing
        (`bootstrap=False`: the options of a single connection, for create_conn)."""
        client = {"bootstrap_servers": self.bootstrap_servers, **pacing} if bootstrap else {}
        return {**client, "client_id": self.client_id, **self.security.client_options()}

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> list[str]:
        async with self._admin("create topics") as admin:
            brokers = len((await admin.describe_cluster())["brokers"])
            existing = set(await admin.list_topics())
            missing = [s for s in specs if s.name not in existing]
            replication = min(3, brokers)
            created = [s.name for s in missing if await self._create(admin, spec=s, replication=replication)]
            await _listed(admin, created)
            return created

    async def check_ready(self, topics: Sequence[str]) -> None:
        """Return once the cluster answers and every topic of `topics` exists.

        Raises KafkaLogError: retriable while the broker is out of reach, not retriable for a refused
        login or a missing topic (a deployment mistake: `popbridge topics create` was not run)."""
        async with self._admin("connect") as admin:
            missing = sorted(set(topics) - set(await admin.list_topics()))
            if missing:  # a topic this user may not describe is left out of the list too: said at once
                _refuse_unauthorized(await admin.describe_topics(missing))
                # A broker that restarted a moment ago may not list every topic yet: ask again.
                await _listed(admin, missing, within=MISSING_WITHIN)
                missing = sorted(set(topics) - set(await admin.list_topics()))
        if missing:
            raise KafkaLogError(
                f"kafka: missing topics {', '.join(missing)}: run `popbridge topics create`",
                retriable=False,
            )

    @asynccontextmanager
    async def _admin(self, doing: str) -> AsyncIterator[AIOKafkaAdminClient]:
        admin = AIOKafkaAdminClient(**self._client_options())
        try:
            await admin.start()
            yield admin
        except KafkaError as exc:
            raise await self._failed(exc, doing) from exc
        finally:
            await admin.close()
        BROKER.recovered()

    async def partitions(self, topic: str) -> list[int]:
        """The partition numbers of `topic` (empty when it does not exist)."""
        async with self._admin(f"describe {topic}") as admin:
            described = await admin.describe_topics([topic])
        _refuse_unauthorized(described)
        return sorted(p["partition"] for t in described if t["error_code"] == 0 for p in t["partitions"])

    async def end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset the next record written will get."""
        partitions = await self.partitions(topic)
        consumer = AIOKafkaConsumer(**self._client_options(pacing=_LOOKUP_PACING))
        try:
            await consumer.start()
            ends = await consumer.end_offsets([KafkaTopicPartition(topic, p) for p in partitions])
        except KafkaError as exc:
            raise await self._failed(exc, f"end offsets of {topic}") from exc
        finally:
            await _stop(consumer)
        return {tp.partition: offset for tp, offset in ends.items()}

    async def scan(self, topic: str) -> AsyncIterator[Record]:
        """Every record of `topic` from the beginning up to its end at the time of the call."""
        ends = {p: o for p, o in (await self.end_offsets(topic)).items() if o > 0}
        if not ends:
            return
        consumer = AIOKafkaConsumer(
            **self._client_options(),
            enable_auto_commit=False,
            max_partition_fetch_bytes=_PREFETCH_PARTITION_BYTES,
            fetch_max_bytes=_PREFETCH_BYTES,
        )
        try:
            await consumer.start()
            consumer.assign([KafkaTopicPartition(topic, p) for p in ends])
            await consumer.seek_to_beginning()
            while ends:
                batches = await consumer.getmany(timeout_ms=1000)
                for tp, messages in batches.items():
                    for m in messages:
                        if m.offset < ends.get(tp.partition, 0):
                            yield Record(m.topic, m.partition, m.offset, m.key, m.value or b"", m.timestamp)
                for p, end in list(ends.items()):
                    if await consumer.position(KafkaTopicPartition(topic, p)) >= end:
                        del ends[p]
        except KafkaError as exc:
            raise await self._failed(exc, f"read {topic}") from exc
        finally:
            await _stop(consumer)

    async def read_from(self, topic: str, starts: Mapping[int, int]) -> AsyncIterator[list[Record]]:
        """The records of the partitions of `starts` from each start to the end at the time of the call."""
        tps = {p: KafkaTopicPartition(topic, p) for p in starts}
        if not tps:
            return
        # 1 MiB a partition bounds what is buffered while the records are applied (the broker still sends a
        # larger first record whole, so nothing is cut off).
        consumer = AIOKafkaConsumer(**self._client_options(), enable_auto_commit=False,
                                    max_partition_fetch_bytes=_READ_BYTES, fetch_max_bytes=_PREFETCH_BYTES)
        try:
            await consumer.start()
            ends = {tp.partition: o for tp, o in (await consumer.end_offsets(list(tps.values()))).items()}
            left = {p: ends[p] for p, start in starts.items() if start < ends[p]}
            consumer.assign([tps[p] for p in left])
            for p in left:
                consumer.seek(tps[p], starts[p])
            while left:
                batches = await consumer.getmany(*(tps[p] for p in left), timeout_ms=1000, max_records=5000)
                batch = [record_of(m) for tp, ms in batches.items() for m in ms
                         if m.offset < left.get(tp.partition, 0)]
                if batch:
                    yield batch
                for p in [p for p in left if await consumer.position(tps[p]) >= left[p]]:
                    del left[p]
        except KafkaError as exc:
            raise await self._failed(exc, f"read {topic}") from exc
        finally:
            await _stop(consumer)

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        """Per partition, the group's committed offset (partitions without a commit are absent)."""
        async with self._admin(f"committed offsets of {group}") as admin:
            offsets = await admin.list_consumer_group_offsets(group)
        return {
            tp.partition: meta.offset
            for tp, meta in offsets.items()
            if tp.topic == topic and meta.offset >= 0
        }

    @staticmethod
    async def _create(admin: AIOKafkaAdminClient, *, spec: TopicSpec, replication: int) -> bool:
        """Create one topic; False when it exists already (metadata lags behind recent creations, and
        another replica may create it between our listing and this call)."""
        topic = NewTopic(spec.name, spec.partitions, replication, topic_configs=dict(spec.config))
        try:
            response = await admin.create_topics([topic])
        except TopicAlreadyExistsError:
            return False
        # aiokafka reports per-topic failures in the response instead of raising them.
        for _, code, message in response.topic_errors:
            if code == TopicAlreadyExistsError.errno:
                return False
            if code != 0:
                error = for_code(code)
                raise KafkaLogError(
                    f"kafka: create topic {spec.name}: {error.__name__}: {message}",
                    retriable=bool(error.retriable),
                )
        return True

    @asynccontextmanager
    async def producer(self) -> AsyncIterator[KafkaProducer]:
        producer = KafkaProducer(self._started_producer, await self._started_producer())
        try:
            yield producer
        finally:
            await producer.close()

    async def _started_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            **self._client_options(),
            acks="all",
            enable_idempotence=True,
            max_request_size=_REQUEST_BYTES,
            compression_type=self.compression,
            linger_ms=5,
        )
        try:
            await producer.start()
        except BaseException as exc:
            await producer.stop()  # a failed start leaves connections open (aiokafka#1130)
            if isinstance(exc, KafkaError):
                raise await self._failed(exc, "connect producer") from exc
            raise
        return producer

    @asynccontextmanager
    async def consumer(
        self, group: str, topics: Sequence[str], *, on_revoked: OnRevoked | None = None,
        co_partitioned: bool = False,
    ) -> AsyncIterator[KafkaConsumer]:
        """A group member. `on_revoked` runs in aiokafka's rebalance listener, before this member rejoins:
        the broker waits for it (rebalance_timeout_ms, raised to REVOKE_TIMEOUT) to complete the rebalance
        and only then gives the partitions to others. Heartbeats go on while it runs.

        aiokafka's default assignor is round robin over all partitions of all topics (0.14: not Kafka's
        range default), which splits partition N of two topics between members; `co_partitioned` takes the
        range assignor, which lays each topic's partitions out over the members sorted by id, so with equal
        partition counts partition N of every topic lands on one member."""
        rebalance = _Rebalance(on_revoked, group)
        extra = {"rebalance_timeout_ms": int(REVOKE_TIMEOUT * 1000)} if on_revoked is not None else {}
        consumer = AIOKafkaConsumer(
            **self._client_options(),
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=_PREFETCH_PARTITION_BYTES,
            fetch_max_bytes=_PREFETCH_BYTES,
            isolation_level="read_committed",
            session_timeout_ms=int(GROUP_SESSION_TIMEOUT * 1000),
            heartbeat_interval_ms=int(GROUP_HEARTBEAT_INTERVAL * 1000),
            partition_assignment_strategy=(
                (RangePartitionAssignor,) if co_partitioned else (RoundRobinPartitionAssignor,)
            ),
            **extra,
        )
        if topics:  # as AIOKafkaConsumer(*topics) does, with the listener
            consumer.subscribe(list(topics), listener=rebalance)
        try:
            await consumer.start()
        except BaseException as exc:
            await _stop(consumer)  # a failed start leaves connections open (aiokafka#1130)
            if isinstance(exc, KafkaError):
                raise await self._failed(exc, "connect consumer") from exc
            raise
        try:
            yield KafkaConsumer(consumer, rebalance)
        finally:
            await consumer.stop()

    # Admin operations for the ops commands (services.runtime.ops_log, used by services.ops). The embedded log
    # (services.runtime.embedded) has the same methods, so the ops code runs against either.

    async def start_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset of the earliest record still kept (retention moves it)."""
        async with self.reading(f"start offsets of {topic}") as reads:
            return await reads.start_offsets(topic)

    async def offsets_for_time(self, topic: str, timestamp_ms: int) -> dict[int, int]:
        """Per partition, the first offset whose record timestamp is >= `timestamp_ms`, else the end offset.

        The broker's time index answers (ListOffsets), as for `kafka-consumer-groups --to-datetime`.
        """
        async with self.reading(f"offsets by time of {topic}") as reads:
            return await reads.offsets_for_time(topic, timestamp_ms)

    async def read(
        self, topic: str, partition: int, start: int, end: int, *, key: bytes | None = None
    ) -> list[Record]:
        """The records of one partition with `start <= offset < end` (offsets past the log end are ignored),
        only those keyed `key` when given.

        Each call starts a consumer (~0.1 s): callers read a range in chunks, not one record per call, or
        keep a `reading()` open for many.
        """
        async with self.reading(f"read {topic}/{partition}") as reads:
            return await reads.read(topic, partition, start, end, key=key)

    @asynccontextmanager
    async def reading(self, doing: str = "read") -> AsyncIterator[KafkaReads]:
        """A few plain consumers for an ops command's offset lookups and ranged reads (services.runtime
        .kafka_reads), instead of a client started for each; all stopped at the end. `doing` names the
        work in the error a Kafka failure becomes."""
        async with contextlib.AsyncExitStack() as consumers:
            yield KafkaReads(lambda: consumers.enter_async_context(
                self._plain_consumer(doing, fetch_bytes=_READ_BYTES)), self.partitions)

    async def active_members(self, group: str) -> list[KafkaGroupMember]:
        """The members of `group` now (empty when the group is Empty, Dead or unknown)."""
        async with self._admin(f"describe group {group}") as admin:
            responses = await admin.describe_consumer_groups([group])
        return [
            KafkaGroupMember(m["member_id"], f"{m['client_id']}@{m['client_host'].lstrip('/')}")
            for response in responses
            for described in response.to_object()["groups"]
            if described["group"] == group
            for m in described["members"]
        ]

    async def set_committed(
        self, group: str, offsets: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        """Move the committed offsets of a stopped group, clamped to the records kept; returns what was set.

        aiokafka's admin client cannot alter group offsets, so a consumer with the group's id commits for
        manually assigned partitions: generation -1, which the broker accepts only while the group has no
        members (verified on Kafka 4.3: a live member makes it fail with UNKNOWN_MEMBER_ID). Refused
        (KafkaLogError, not retriable) while the group has members, as `kafka-consumer-groups` does.
        """
        members = await self.active_members(group)
        if members:
            raise KafkaLogError(_live_group_message(group, members), retriable=False)
        clamped = await self._clamped(offsets)
        if not clamped:
            return clamped
        consumer = AIOKafkaConsumer(
            **self._client_options(),
            group_id=group,
            enable_auto_commit=False,
        )
        try:
            await consumer.start()
            consumer.assign([KafkaTopicPartition(tp.topic, tp.partition) for tp in clamped])
            await consumer.commit(
                {
                    KafkaTopicPartition(tp.topic, tp.partition): OffsetAndMetadata(offset, "")
                    for tp, offset in clamped.items()
                }
            )
        except (CommitFailedError, UnknownMemberIdError, IllegalGenerationError) as exc:
            raise KafkaLogError(
                f"group {group!r} became active while its offsets were moved: {exc}", retriable=False
            ) from exc
        except KafkaError as exc:
            raise await self._failed(exc, f"commit offsets of {group}") from exc
        finally:
            await consumer.stop()
        return clamped

    async def _clamped(self, offsets: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        result: dict[TopicPartition, int] = {}
        for topic in sorted({tp.topic for tp in offsets}):
            starts, ends = await self.start_offsets(topic), await self.end_offsets(topic)
            for tp, offset in offsets.items():
                if tp.topic == topic and tp.partition in ends:
                    result[tp] = min(max(offset, starts[tp.partition]), ends[tp.partition])
        return dict(sorted(result.items()))

    @asynccontextmanager
    async def _plain_consumer(
        self, doing: str, fetch_bytes: int = _PREFETCH_PARTITION_BYTES
    ) -> AsyncIterator[AIOKafkaConsumer]:
        """A consumer outside any group, for offset lookups and ranged reads."""
        consumer = AIOKafkaConsumer(
            **self._client_options(pacing=_LOOKUP_PACING),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=fetch_bytes,
            fetch_max_bytes=_PREFETCH_BYTES,
        )
        try:
            await consumer.start()
            yield consumer
        except KafkaError as exc:
            raise await self._failed(exc, doing) from exc
        finally:
            await _stop(consumer)


_READ_BYTES = 1024 * 1024
_CLOSE_WAIT_SECONDS = 5.0  # a TLS shutdown the broker does not answer is abandoned after this


@dataclass(frozen=True)
class KafkaGroupMember:
    """A member of a consumer group as the broker describes it."""

    member_id: str
    client: str  # client id @ host


def _live_group_message(group: str, members: Sequence[KafkaGroupMember]) -> str:
    clients = ", ".join(sorted({m.client for m in members}))
    return (
        f"group {group!r} has {len(members)} active member(s) ({clients}):"
        " stop them before moving its offsets"
    )


async def _closed(conn: AIOKafkaConnection) -> None:
    """Close `conn` and wait until its socket is gone. aiokafka closes a connection that failed its login
    but does not wait: over TLS the socket outlives the close by the shutdown handshake, and a caller that
    ends its event loop right after the error (a one-shot command, a test) leaks it. `close()` is
    idempotent and returns the future of the socket's end."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(conn.close()), _CLOSE_WAIT_SECONDS)


async def _stop(consumer: AIOKafkaConsumer) -> None:
    await asyncio.sleep(0)  # aiokafka's stop() right after start() re-raises a CancelledError
    await consumer.stop()


def _refuse_unauthorized(described: Sequence[Mapping[str, Any]]) -> None:
    """Raise (not retriable) when the broker refused to describe a topic: without its ACLs a topic looks
    missing, and "run `popbridge topics create`" would send the operator the wrong way."""
    refused = sorted(t["topic"] for t in described if t["error_code"] == TopicAuthorizationFailedError.errno)
    if refused:
        raise KafkaRefusedError(
            f"kafka: not authorized to describe topics {', '.join(refused)}: check this user's ACLs",
            retriable=False,
        )


