"""Running the three stages in-process for journeys on the real broker: one pass each, until idle."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path

from schemas.topics import TOPICS, TopicSpec
from services.deliverer.service import Deliverer
from services.deliverer.smtp import SmtpTransport
from services.fetcher.commands import run_fetcher
from services.fetcher.service import PassResult
from services.router.worker import run_router
from services.runtime.kafka import KafkaLog
from services.runtime.settings import DeploymentSettings, MailConfig, load_config

log = logging.getLogger("tests.pipeline")

# The one trace field the deliverer prepends ends with its date's zone offset and a line ending.
# Continuation lines cannot tell where it ends: a message may itself start with white space.
_TRACE_FIELD = re.compile(rb"\AReceived: .*?[+-][0-9]{4}\r?\n", re.DOTALL)


def without_trace_field(content: bytes) -> bytes:
    """The message as it was before popbridge prepended its Received field (asserting there was one)."""
    match = _TRACE_FIELD.match(content)
    assert match is not None, content[:200]
    return content[match.end() :]


class Pipeline:
    """fetcher -> Kafka -> router (faust) -> Kafka -> deliverer, with a test's own topics and groups."""

    def __init__(self, bootstrap: str, prefix: str, config_path: Path, environ: Mapping[str, str]) -> None:
        self.log = KafkaLog(bootstrap)
        self.settings = DeploymentSettings(
            kafka_bootstrap=bootstrap, topic_prefix=prefix, group_prefix=prefix + "g"
        )
        self.config: MailConfig = load_config(config_path)
        self.environ = dict(environ)

    async def create_topics(self) -> None:
        await self.log.ensure_topics(
            [TopicSpec(self.settings.topic(s.name), s.partitions, s.config) for s in TOPICS]
        )

    async def fetch(self) -> list[PassResult]:
        return await run_fetcher(self.log, self.settings, self.config, self.environ, once=True)

    async def route(self) -> None:
        await run_router(self.settings, self.config, until_idle=True)

    async def deliver(self) -> None:
        async with SmtpTransport(self.config.delivery, None) as transport:
            await Deliverer(self.log, self.settings, transport).run(until_idle=True)

    async def run_once(self) -> list[PassResult]:
        started = time.monotonic()
        results = await self.fetch()
        fetched = time.monotonic()
        await self.route()
        routed = time.monotonic()
        await self.deliver()
        log.info(
            "pipeline: fetch %.1f s, route %.1f s, deliver %.1f s",
            fetched - started,
            routed - fetched,
            time.monotonic() - routed,
        )
        return results


def sample_message(n: int, *, size: int = 0, tag: str = "test") -> bytes:
    """A small message to alice@example.com with a unique Message-ID; `size` bytes of padding."""
    head = (f"From: a@outside.example\r\nTo: alice@example.com\r\nSubject: {tag} {n}\r\n"
            f"Message-ID: <{tag}-{n}@outside.example>\r\n\r\nbody {n}\r\n")
    return head.encode() + b"x" * size + b"\r\n"
