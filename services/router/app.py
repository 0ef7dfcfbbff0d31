"""The faust-streaming router: a thin agent around the pure stage (services.router.stage).

Bytes at the boundary: the agent decodes `MailFetched` with msgspec, calls `route_fetched`, encodes
`RecipientsResolved` and sends it keyed by fetch id. Processing is at-least-once: faust flushes the
producer before it commits an offset, and the deliverer's ledger makes a repeated routed event harmless.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import faust

from schemas import codec
from schemas.events import MailFetched
from schemas.topics import FETCHED, MAX_MESSAGE_BYTES, ROUTED
from services.router.stage import route_fetched
from services.runtime.settings import DeploymentSettings, MailConfig

log = logging.getLogger("popbridge.router")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def faust_broker_url(bootstrap: str) -> str:
    """faust wants `kafka://a:9092;kafka://b:9092` where Kafka clients take `a:9092,b:9092`."""
    return ";".join(f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip())


def create_app(settings: DeploymentSettings, config: MailConfig, *, clock: Clock = utc_now) -> faust.App:
    """A fresh router app (one per test, one per process) with its agent registered."""
    if not settings.kafka_bootstrap:
        raise ValueError("the faust router needs Kafka bootstrap servers")
    app = faust.App(
        settings.group("router"),
        broker=faust_broker_url(settings.kafka_bootstrap),
        autodiscover=False,
        web_enabled=False,
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_max_request_size=MAX_MESSAGE_BYTES + 1024 * 1024,
        consumer_max_fetch_size=MAX_MESSAGE_BYTES + 1024 * 1024,
        broker_commit_every=100,
        broker_commit_interval=1.0,
        topic_disable_leader=True,
    )
    fetched = app.topic(settings.topic(FETCHED), key_type=bytes, value_type=bytes, internal=False)
    routed = app.topic(settings.topic(ROUTED), key_type=bytes, value_type=bytes, internal=False)

    @app.agent(fetched, name="popbridge.router.route")
    async def route(stream: Any) -> AsyncIterator[None]:
        async for event in stream.events():
            await _route_one(event.value, config, clock, routed)
            yield None

    return app


async def _route_one(value: bytes, config: MailConfig, clock: Clock, routed: Any) -> None:
    """Route one record; a record that is not a MailFetched is logged and skipped, never stops the stream."""
    try:
        fetched = codec.decode(value, MailFetched)
    except codec.EventDecodeError as exc:
        log.error("skipping a record that is not a MailFetched event: %s", exc)
        return
    resolved = route_fetched(fetched, config, clock())
    await routed.send(key=fetched.fetch_id.encode(), value=codec.encode(resolved))
    log.info(
        "routed fetch_id=%s reason=%s recipients=%d rules=%s",
        fetched.fetch_id, resolved.reason, len(resolved.recipients), resolved.rules_version,
    )
