"""The fetcher stage: drain each configured POP3 mailbox into the fetched topic.

Never lose a message: a message is deleted (delete mode) only after the broker acknowledged both its
`MailFetched` event and the `FetchRecorded` memory entry; a message published but not deleted (the
session dropped before QUIT) is deleted on the next pass without publishing again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from schemas import codec
from schemas.events import FetchRecorded, MailFetched, fetch_id_for, fetch_state_key
from schemas.topics import FETCH_STATE, FETCHED
from services.fetcher.memory import FetchMemory
from services.fetcher.plan import Listed, plan_pass
from services.fetcher.pop3 import Pop3Client, Pop3Error, tls_context
from services.runtime.log import LogProducer, Outgoing
from services.runtime.secrets import read_secret
from services.runtime.settings import ConfigError, DeploymentSettings, Mailbox

log = logging.getLogger("popbridge.fetcher")

Clock = Callable[[], datetime]

# Publish and delete in batches: one broker round trip covers many messages, and a dropped session
# loses at most one batch of deletions (they are redone on the next pass, without republishing).
BATCH_MESSAGES = 32
BATCH_BYTES = 32 * 1024 * 1024


def batches(messages: list[Listed]) -> list[list[Listed]]:
    """Consecutive groups of at most BATCH_MESSAGES messages and (beyond the first) BATCH_BYTES bytes."""
    groups: list[list[Listed]] = []
    size = 0
    for message in messages:
        if not groups or len(groups[-1]) >= BATCH_MESSAGES or size + message.size > BATCH_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(message)
        size += message.size
    return groups


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class PassResult:
    mailbox_id: str
    published: int = 0
    deleted: int = 0
    too_big: int = 0
    error: str | None = None


@dataclass
class Fetcher:
    """One fetcher: its producer, its memory and the way it finds passwords."""

    settings: DeploymentSettings
    producer: LogProducer
    memory: FetchMemory
    environ: Mapping[str, str]
    clock: Clock = utc_now

    async def poll_all(self, mailboxes: Sequence[Mailbox]) -> list[PassResult]:
        """One pass over every mailbox, concurrently; one mailbox's failure does not touch the others."""
        return list(await asyncio.gather(*(self.poll(m) for m in mailboxes)))

    async def poll(self, mailbox: Mailbox) -> PassResult:
        try:
            return await self._drain(mailbox)
        except (Pop3Error, ConfigError) as exc:
            log.warning("mailbox %s: %s", mailbox.id, exc)
            return PassResult(mailbox.id, error=str(exc))

    async def _drain(self, mailbox: Mailbox) -> PassResult:
        password = read_secret(
            env=mailbox.password_env,
            file=mailbox.password_file,
            environ=self.environ,
            what=f"mailboxes[{mailbox.id}] password",
        )
        context = tls_context(mailbox.ca_file, verify=mailbox.verify_tls)
        if not mailbox.verify_tls:
            log.warning("mailbox %s: TLS certificate verification is OFF (verify_tls = false)", mailbox.id)
        async with await Pop3Client.connect(
            mailbox.host,
            mailbox.effective_port,
            tls=mailbox.tls,
            ssl_context=context,
            timeout=mailbox.timeout,
        ) as client:
            await client.login(mailbox.username, password)
            uidls = await client.uidl()
            sizes = await client.list()
            listing = [Listed(n, uidls[n], sizes.get(n, 0)) for n in sorted(uidls)]
            plan = plan_pass(
                listing,
                self.memory.known(mailbox.id),
                mode=mailbox.mode,
                max_message_size=mailbox.max_message_size,
            )
            for message in plan.too_big:
                log.warning(
                    "mailbox %s: message %s is %d bytes, over max_message_size %d: left on the server",
                    mailbox.id,
                    message.uidl,
                    message.size,
                    mailbox.max_message_size,
                )
            if plan.delete_only:
                await client.dele_many([m.number for m in plan.delete_only])
            published = await self._publish_all(client, mailbox, plan.retrieve)
            await client.quit()
        deleted = len(plan.delete_only) + (published if mailbox.mode == "delete" else 0)
        return PassResult(mailbox.id, published=published, deleted=deleted, too_big=len(plan.too_big))

    async def _publish_all(self, client: Pop3Client, mailbox: Mailbox, messages: list[Listed]) -> int:
        published = 0
        for batch in batches(messages):
            retrieved = {n: raw async for n, raw in client.retr_many([m.number for m in batch])}
            published += await self._publish_batch(client, mailbox, [(m, retrieved[m.number]) for m in batch])
        return published

    async def _publish_batch(
        self, client: Pop3Client, mailbox: Mailbox, batch: list[tuple[Listed, bytes]]
    ) -> int:
        now = self.clock()
        events = [self._event(mailbox, listed, raw, now) for listed, raw in batch]
        await self.producer.send_all(
            [Outgoing(self.settings.topic(FETCHED), codec.encode(e), e.fetch_id.encode()) for e in events]
        )
        records = [
            FetchRecorded(
                mailbox_id=mailbox.id,
                uidl=e.uidl,
                fetch_id=e.fetch_id,
                size=listed.size,
                sha256=e.sha256,
                published_at=now,
            )
            for e, (listed, _) in zip(events, batch, strict=True)
        ]
        await self.producer.send_all(
            [
                Outgoing(
                    self.settings.topic(FETCH_STATE), codec.encode(r), fetch_state_key(r.mailbox_id, r.uidl)
                )
                for r in records
            ]
        )
        for record in records:
            self.memory.remember(record)
            log.info("mailbox %s: published uidl=%s fetch_id=%s", mailbox.id, record.uidl, record.fetch_id)
        if mailbox.mode == "delete":
            await client.dele_many([listed.number for listed, _ in batch])
        return len(batch)

    @staticmethod
    def _event(mailbox: Mailbox, listed: Listed, raw: bytes, now: datetime) -> MailFetched:
        return MailFetched(
            fetch_id=fetch_id_for(mailbox.id, listed.uidl),
            mailbox_id=mailbox.id,
            pop3_host=mailbox.host,
            uidl=listed.uidl,
            size=len(raw),
            sha256=hashlib.sha256(raw).hexdigest(),
            fetched_at=now,
            raw=raw,
        )
