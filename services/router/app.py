"""The faust-streaming router: thin agents around the pure stage (services.router.stage, .dedupe).

    fetched (key: fetch id) --route--> by-message-id (key: Message-ID, internal) --dedupe--> routed
                              \\--------- no Message-ID: straight to routed ----------------/

Copies of one message land on different partitions of the fetched topic (their fetch ids differ);
repartitioning by Message-ID makes them meet in one dedupe agent, whose table (a compacted changelog
topic in Kafka) survives restarts and moves with its partitions. Each replica keeps its partitions of
the table on local disk with the changelog offset applied (services.router.state), so a restart reads
only the changelog's tail; entries past the window are deleted on a timer.

Bytes at the boundary: agents decode and encode with msgspec.

Processing is at-least-once, and the rule is: an offset of fetched or by-message-id is committed only
after every output of that record is acknowledged by the broker (acks=all). Two halves make it hold:

- In our agent code: each output is sent with `send_durably`, which awaits the delivery future faust's
  `Topic.send` returns (that call only queues the record) and tries again with backoff while it fails.
  faust acks an event when its agent moves on to the next, so an acked event's outputs are durable; a
  send that fails is retried, never moved past. (faust's own flush before a commit, PR #273, does not
  cover a send that fails in the background after its event was acked.)
- In faust itself: 0.15.3 committed past records no agent processed, in rebalances (1-2 lost mails per
  replica join in the issue-13 runs, up to 14 after router kills) and stalled partitions for good
  (`min(acked) - committed > 1`). `RouterApp` (services.router.faust_patches) is faust.App with a
  subclassed Consumer and flow control that fix the four causes found; that module says which, with
  the evidence, and why subclasses rather than a fork (the pinned release stays as released; each
  override is tested against faust's own behaviour, so an upgrade shows which can go).

The deliverer's ledger makes a repeated routed event harmless; a missing one would be a loss, so every
doubt resolves to reading again. Kafka transactions (faust's exactly_once) are not used: see the README.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import faust

from schemas import codec
from schemas.events import MailFetched, RecipientsResolved
from schemas.topics import FETCHED, MAX_MESSAGE_BYTES, ROUTED, TopicSpec, topic_spec
from services.router.dedupe import DEFAULT_WINDOW, apply_dedupe, decode_seen, dedupe_key, encode_seen
from services.router.faust_patches import RouterApp
from services.router.stage import route_fetched, to_postmaster
from services.router.state import EXPIRE_EVERY, SeenCopiesTable, expire_partition, prune_at_ms
from services.runtime.kafka_security import KafkaSecurity, kafka_security
from services.runtime.log import GROUP_HEARTBEAT_INTERVAL, GROUP_SESSION_TIMEOUT
from services.runtime.metrics import Metrics
from services.runtime.settings import DeploymentSettings, MailConfig
from services.runtime.stages import (
    ROUTER_REPARTITION_CONFIG,
    ROUTER_SEEN_TABLE,
    router_internal_topics,
    router_repartition_topic,
)

log = logging.getLogger("popbridge.router")

Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]
SEND_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)  # seconds between tries of a send that failed
_LOGGED_FAILURES = frozenset({0, 1})  # then one line every _LOG_EVERY_NTH_FAILURE: about one a minute
_LOG_EVERY_NTH_FAILURE = 6
_FETCH_BYTES = MAX_MESSAGE_BYTES + 1024 * 1024
# Fetched ahead per partition (aiokafka's max_partition_fetch_bytes), as services.runtime.kafka's consumers:
# at _FETCH_BYTES each of the router's 12 partitions (fetched, repartition) could buffer 65 MB. A larger
# record still comes (the broker returns the first batch of a response whatever its size).
_PREFETCH_PARTITION_BYTES = 1024 * 1024
# Events an agent's stream holds unprocessed (faust's stream_buffer_maxsize, 4096 by default): faust moves
# whatever aiokafka fetched into the stream's queue and pauses the partition's fetching only past 80 % of
# this, so at 4096 a stream could hold thousands of whole messages. bench/e2e stages, 1,000 messages, in
# pairs of runs against 4096: router peak RSS 162-198 -> 133-163 MB at 256, 113-141 MB at 64, but 64 cut
# single-drop throughput in both pairs (51 vs 99, 66 vs 90 msg/s); 256 was within the runs' noise.
STREAM_BUFFER = 256


def utc_now() -> datetime:
    return datetime.now(UTC)


def faust_broker_url(bootstrap: str) -> str:
    """faust wants `kafka://a:9092;kafka://b:9092` where Kafka clients take `a:9092,b:9092`."""
    return ";".join(f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip())


def faust_credentials(security: KafkaSecurity) -> faust.types.auth.CredentialsT | None:
    """The same TLS and SASL options as KafkaLog's clients, as faust's `broker_credentials`.

    faust 0.15 hands them to its aiokafka producer, consumers and topic creation unchanged
    (transport.drivers.aiokafka.credentials_to_aiokafka_auth); SCRAM-SHA-256/512 are SASLMechanism values.
    """
    if security.sasl:
        return faust.SASLCredentials(
            username=security.username,
            password=security.password,
            mechanism=security.mechanism,
            ssl_context=security.ssl_context if security.tls else None,
        )
    if security.tls:
        return faust.SSLCredentials(security.ssl_context)
    return None


def repartition_topic(settings: DeploymentSettings) -> str:
    return router_repartition_topic(settings)


SEEN_TABLE = ROUTER_SEEN_TABLE


def internal_topics(settings: DeploymentSettings) -> list[TopicSpec]:
    """The router's own topics, created before the app starts (services.runtime.stages says why)."""
    return router_internal_topics(settings)


def create_app(
    settings: DeploymentSettings,
    config: MailConfig,
    *,
    clock: Clock = utc_now,
    dedupe_window: timedelta = DEFAULT_WINDOW,
    metrics: Metrics | None = None,
    security: KafkaSecurity | None = None,
    sleep: Sleep = asyncio.sleep,
    progress: Callable[[], None] = lambda: None,
    state_dir: Path | None = None,
) -> faust.App:
    """A fresh router app (one per process, one per test) with its agents and table registered.

    `security` defaults to the one the settings describe (which reads the SASL password file);
    `progress` is called after each record an agent handled (the liveness probe's progress);
    `state_dir` holds the dedupe table's partitions on disk (services.router.state). None keeps the
    table in memory, rebuilt from the whole changelog at each start: the old way, kept for the bench's
    comparison only."""
    if not settings.kafka_bootstrap:
        raise ValueError("the faust router needs Kafka bootstrap servers")
    if security is None:
        security = kafka_security(settings)
    partitions = topic_spec(FETCHED).partitions
    app = RouterApp(
        settings.group("router"),
        broker=faust_broker_url(settings.kafka_bootstrap),
        broker_credentials=faust_credentials(security),
        autodiscover=False,
        web_enabled=False,
        store="memory://",  # the default; the dedupe table brings its own store (services.router.state)
        key_serializer="raw",
        value_serializer="raw",
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_max_request_size=_FETCH_BYTES,
        consumer_max_fetch_size=_PREFETCH_PARTITION_BYTES,
        stream_buffer_maxsize=STREAM_BUFFER,
        broker_commit_every=100,
        broker_commit_interval=1.0,
        topic_partitions=partitions,
        # A killed replica's partitions wait for its session to expire before they move: faust's 60 s
        # default held mail that long after a SIGKILL. Every stage's groups use the same (runtime.log).
        broker_session_timeout=GROUP_SESSION_TIMEOUT,
        broker_heartbeat_interval=GROUP_HEARTBEAT_INTERVAL,
        # Standby copies would prune keys their owner is writing; the changelog is the durable copy.
        table_standby_replicas=0,
    )
    fetched = app.topic(settings.topic(FETCHED), key_type=bytes, value_type=bytes)
    routed = app.topic(settings.topic(ROUTED), key_type=bytes, value_type=bytes)
    by_message_id = app.topic(
        repartition_topic(settings),
        key_type=bytes,
        value_type=bytes,
        internal=True,
        partitions=partitions,
        config=dict(ROUTER_REPARTITION_CONFIG),
    )
    seen = _seen_table(app, partitions, state_dir, dedupe_window)
    if isinstance(seen, SeenCopiesTable):
        _expire_on_a_timer(app, seen, by_message_id, clock, dedupe_window)

    @app.agent(fetched, name="popbridge.router.route")
    async def route(stream: Any) -> AsyncIterator[None]:
        async for event in stream.events():
            resolved = _route_one(event.value, config, clock)
            if resolved is None:
                if metrics is not None:
                    metrics.skipped("router")
            elif (key := dedupe_key(resolved)) is not None:
                await send_durably(by_message_id, key, codec.encode(resolved), sleep=sleep)
            else:
                await _publish(routed, resolved, metrics, sleep)
            progress()
            yield None

    @app.agent(by_message_id, name="popbridge.router.dedupe")
    async def dedupe(stream: Any) -> AsyncIterator[None]:
        async for event in stream.events():
            resolved = codec.decode(event.value, RecipientsResolved)
            emitted, remembered = apply_dedupe(
                resolved, decode_seen(seen.get(event.key)), clock(), dedupe_window
            )
            seen[event.key] = encode_seen(remembered)
            await _publish(routed, emitted, metrics, sleep)
            progress()
            yield None

    return app


def _seen_table(app: faust.App, partitions: int, state_dir: Path | None, window: timedelta) -> Any:
    if state_dir is None:
        return app.Table(SEEN_TABLE, key_type=bytes, value_type=bytes, partitions=partitions)
    table = SeenCopiesTable(
        app, name=SEEN_TABLE, key_type=bytes, value_type=bytes, partitions=partitions,
        beacon=app.tables.beacon, directory=state_dir, prune_at=prune_at_ms(window),
    )
    return app.tables.add(table)


def _expire_on_a_timer(
    app: faust.App, seen: SeenCopiesTable, source: Any, clock: Clock, window: timedelta
) -> None:
    """Every EXPIRE_EVERY seconds, prune the due entries of the partitions this replica processes; not
    while a rebalance or a restore is under way (a partition may be moving)."""
    topics = {source.get_topic_name(), seen.changelog_topic.get_topic_name()}

    @app.timer(EXPIRE_EVERY, name="popbridge.router.expire")  # type: ignore[untyped-decorator]  # faust's
    async def expire() -> None:
        if app.in_recovery or not app.flow_control.is_active():
            return
        now = clock()
        active = app.assignor.assigned_actives()
        for partition in sorted({tp.partition for tp in active if tp.topic in topics}):
            deleted = expire_partition(seen, partition, now, window)
            if deleted:
                log.info("dedupe: %d entries past the window deleted from partition %d", deleted, partition)


def _route_one(value: bytes, config: MailConfig, clock: Clock) -> RecipientsResolved | None:
    """Route one record. Never raises: a routing failure sends the message to the postmaster."""
    try:
        fetched = codec.decode(value, MailFetched)
    except codec.EventDecodeError as exc:
        log.error("skipping a record that is not a MailFetched event: %s", exc)  # noqa: TRY400 - no traceback: not a bug here
        return None
    try:
        return route_fetched(fetched, config, clock())
    except Exception as exc:  # a bug in the core must not stop the stream or lose the message
        log.exception("fetch_id=%s: routing failed, sending to the postmaster", fetched.fetch_id)
        return to_postmaster(fetched, config, clock(), f"{type(exc).__name__}: {exc}")


async def send_durably(topic: Any, key: bytes, value: bytes, *, sleep: Sleep = asyncio.sleep) -> None:
    """Send one record and return once the broker acknowledged it (acks=all), trying again with backoff
    while it fails: the event being handled is acked only after this returns, so its offset is never
    committed past an output that is not durable. faust's `Topic.send` only queues the record and hands
    back the delivery future; a failure there would otherwise surface after the event was acked."""
    failures = 0
    while True:
        try:
            delivery = await topic.send(key=key, value=value)
            await delivery
        except Exception as exc:  # any failure: the record is not durable, so the event is not done
            delay = SEND_RETRY_DELAYS[min(failures, len(SEND_RETRY_DELAYS) - 1)]
            if failures in _LOGGED_FAILURES or failures % _LOG_EVERY_NTH_FAILURE == 0:
                log.warning(
                    "sending to %s failed (%d times): %s: %s; trying again in %.1f s",
                    topic.get_topic_name(), failures + 1, type(exc).__name__, exc, delay,
                )
            failures += 1
            await sleep(delay)
        else:
            if failures:
                log.info("sent to %s after %d failed tries", topic.get_topic_name(), failures)
            return


async def _publish(routed: Any, resolved: RecipientsResolved, metrics: Metrics | None, sleep: Sleep) -> None:
    await send_durably(routed, resolved.fetch_id.encode(), codec.encode(resolved), sleep=sleep)
    if metrics is not None:
        metrics.routed(resolved.reason)
    log.info(
        "routed fetch_id=%s reason=%s recipients=%d suppressed=%d rules=%s",
        resolved.fetch_id,
        resolved.reason,
        len(resolved.recipients),
        len(resolved.suppressed),
        resolved.rules_version or "-",
    )
