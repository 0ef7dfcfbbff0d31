"""The fetcher on the real broker and Dovecot: mailboxes on the test server, a Fetcher, what it published."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from schemas import codec
from schemas.events import FetchRecorded, MailFetched
from schemas.topics import FETCH_ASSIGNMENT, FETCH_STATE, FETCHED, TopicSpec, topic_spec
from services.fetcher.commands import open_fetch_memory
from services.fetcher.service import Fetcher
from services.runtime.kafka import KafkaLog
from services.runtime.settings import DeploymentSettings, Mailbox
from tests.support.dovecot import DovecotMailboxes, MailUser


def dovecot_mailbox(
    dovecot: DovecotMailboxes, user: MailUser, mailbox_id: str = "box", **overrides: Any
) -> Mailbox:
    """A single-user mailbox on the test Dovecot, plain POP3 unless overridden; password in PW_<id>."""
    fields: dict[str, Any] = {
        "id": mailbox_id, "host": dovecot.server.host, "port": dovecot.server.pop3_port, "tls": "none",
        "username": user.login, "password_env": f"PW_{mailbox_id}", "recipients": ("alice@example.com",),
        "ca_file": str(dovecot.server.ca_file), "timeout": 10.0, "poll_interval": 1.0,
    }  # fmt: skip
    fields.update(overrides)
    return Mailbox(**fields)


class FetcherStage:
    """A test's own fetched and fetch-state topics on the shared broker."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.log = KafkaLog(bootstrap)
        self.settings = DeploymentSettings(
            kafka_bootstrap=bootstrap, topic_prefix=prefix, group_prefix=prefix
        )

    async def create_topics(self, *, shared: bool = False) -> None:
        """The fetched and fetch-state topics; `shared`: the assignment topic of replicas too."""
        names = (FETCHED, FETCH_STATE, FETCH_ASSIGNMENT) if shared else (FETCHED, FETCH_STATE)
        specs = [topic_spec(name) for name in names]
        await self.log.ensure_topics(
            [TopicSpec(self.settings.topic(s.name), s.partitions, s.config) for s in specs]
        )

    @asynccontextmanager
    async def fetcher(self, environ: Mapping[str, str], **options: Any) -> AsyncIterator[Fetcher]:
        """A Fetcher whose memory is loaded from the fetch-state topic, as at a start."""
        async with open_fetch_memory(self.log, self.settings) as memory, self.log.producer() as producer:
            yield Fetcher(
                settings=self.settings, producer=producer, memory=memory, environ=environ, **options
            )

    async def published(self) -> list[MailFetched]:
        return [codec.decode(r.value, MailFetched) async for r in self.log.scan(self.settings.topic(FETCHED))]

    async def recorded(self) -> list[FetchRecorded]:
        topic = self.settings.topic(FETCH_STATE)
        return [codec.decode(r.value, FetchRecorded) async for r in self.log.scan(topic)]


def replica_environment(
    stage: FetcherStage, passwords: Mapping[str, str], **extra: str
) -> dict[str, str]:
    """The environment of a `popbridge fetcher` process on the stage's topics (no other POPBRIDGE_*)."""
    own = {k: v for k, v in os.environ.items() if not k.startswith("POPBRIDGE_")}
    settings = stage.settings
    return own | {
        "POPBRIDGE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap or "",
        "POPBRIDGE_TOPIC_PREFIX": settings.topic_prefix, "POPBRIDGE_GROUP_PREFIX": settings.group_prefix,
        "POPBRIDGE_LOG_LEVEL": "INFO", "POPBRIDGE_LOG_FORMAT": "text", **passwords, **extra,
    }  # fmt: skip
