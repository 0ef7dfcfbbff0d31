"""The fetcher stage: drain each configured POP3 mailbox into the fetched topic.

Never lose a message: a message is deleted (delete mode) only after the broker acknowledged both its
`MailFetched` event and the `FetchRecorded` memory entry; a message published but not deleted (the
session dropped before QUIT) is deleted on the next pass without publishing again.

One pass over a mailbox is one or more POP3 sessions: a session QUITs after `quit_every` deletions and
the pass reconnects for the rest, so a dropped line loses little. Retrieval overlaps publishing: while
the broker acknowledges one batch, the next one is already being retrieved (the client lets DELEs go out
between pipelined RETRs).

Failures stay with their mailbox: `poll` turns every POP3, credential, configuration and log failure into
a `PassResult` with a state (`services.fetcher.status`) and logs only changes of state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar, cast

from schemas import codec
from schemas.events import FetchRecorded, MailFetched, fetch_state_key
from schemas.topics import FETCH_STATE, FETCHED
from services.fetcher.credentials import authenticate, session_secret
from services.fetcher.memory import FetchMemory
from services.fetcher.plan import Listed, Plan, fetch_id_of, plan_pass, session_part
from services.fetcher.pop3 import (
    Pop3AuthError,
    Pop3Client,
    Pop3Error,
    Pop3PermanentError,
    Pop3ProtocolError,
    Pop3RetryLater,
    Pop3TemporaryError,
    Pop3TlsError,
    tls_context,
)
from services.fetcher.status import Failure, MailboxStates, State
from services.runtime.health import ProgressTracker
from services.runtime.log import LogError, LogProducer, Outgoing
from services.runtime.metrics import Metrics
from services.runtime.secrets import CredentialError
from services.runtime.settings import ConfigError, DeploymentSettings, Mailbox

log = logging.getLogger("popbridge.fetcher")

Clock = Callable[[], datetime]
_T = TypeVar("_T")
Retrievals = AsyncGenerator[tuple[int, bytes], None]  # what Pop3Client.retr_many is

# Publish and delete in batches: one broker round trip covers many messages, and a dropped session
# loses at most one batch of deletions (they are redone on the next pass, without republishing).
BATCH_MESSAGES = 8
BATCH_BYTES = 8 * 1024 * 1024
# Batches with the broker while the next ones are retrieved: bounds memory to about this many BATCH_BYTES
# (plus one message per batch). Small batches, many in flight: measured fastest with bench/fetch.py.
PUBLISH_AHEAD = 8

AUTH_VERBS = {"user": "PASS", "apop": "APOP", "plain": "AUTH", "xoauth2": "AUTH"}


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
    state: State = "ok"
    retry_after: float | None = None  # the server's floor on the next attempt ([IN-USE], [LOGIN-DELAY])
    login_delay: float | None = None  # LOGIN-DELAY seconds the server advertised after login
    sessions: int = 0


@dataclass
class _Progress:
    """What a pass did so far; kept when a later session of the pass fails."""

    published: int = 0
    deleted: int = 0
    too_big: int = 0
    sessions: int = 0
    login_delay: float | None = None

    def result(self, mailbox_id: str, failure: Failure | None = None) -> PassResult:
        return PassResult(
            mailbox_id, published=self.published, deleted=self.deleted, too_big=self.too_big,
            error=failure.reason if failure else None, state=failure.state if failure else "ok",
            retry_after=failure.retry_after if failure else None, login_delay=self.login_delay,
            sessions=self.sessions,
        )  # fmt: skip


# Failures that belong to one mailbox; anything else is a bug and propagates.
CONTAINED = (Pop3Error, CredentialError, ConfigError, LogError, ValueError, OSError)


def classify(exc: BaseException) -> Failure:
    """The state a failure puts its mailbox in. Every message used here is free of secrets."""
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, Pop3RetryLater):
        state: State = "login-delay" if (exc.code or "").startswith("LOGIN-DELAY") else "in-use"
        return Failure(state, reason, retry_after=exc.retry_after)
    states: list[tuple[type[BaseException], State]] = [
        (Pop3AuthError, "auth-failed"),
        (Pop3TlsError, "tls-failed"),
        (Pop3TemporaryError, "unreachable"),
        (Pop3ProtocolError, "protocol-error"),
        (Pop3PermanentError, "server-refused"),
        (Pop3Error, "server-refused"),
        (CredentialError, "credentials-unavailable"),
        (ConfigError, "credentials-unavailable"),  # read_secret: the variable or file is missing
        (LogError, "publish-failed"),
        (OSError, "unreachable"),
    ]
    for kind, found in states:
        if isinstance(exc, kind):
            return Failure(found, reason)
    return Failure("config-error", reason)  # LocalProtocolError: e.g. a user name POP3 cannot carry


@dataclass
class Fetcher:
    """One fetcher: its producer, its memory and the way it finds passwords.

    `before_plan` (mailbox sharing) runs after login, once the maildrop is ours, and before the plan
    reads the memory: it brings the memory of that mailbox up to date with what another replica wrote.
    """

    settings: DeploymentSettings
    producer: LogProducer
    memory: FetchMemory
    environ: Mapping[str, str]
    clock: Clock = utc_now
    metrics: Metrics | None = None
    tracker: ProgressTracker | None = None
    before_plan: Callable[[Mailbox], Awaitable[None]] | None = None
    states: MailboxStates = field(default_factory=MailboxStates)
    _slots: dict[str, asyncio.Semaphore] = field(default_factory=dict, init=False, repr=False)
    _slot_limits: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _tls_warned: set[str] = field(default_factory=set, init=False, repr=False)
    _too_big_reported: dict[str, set[str]] = field(default_factory=dict, init=False, repr=False)

    def limit_hosts(self, mailboxes: Iterable[Mailbox]) -> None:
        """Per POP3 host, the smallest `max_connections_per_host` of the mailboxes on it."""
        for mailbox in mailboxes:
            host = mailbox.host.lower()
            limit = min(self._slot_limits.get(host, mailbox.max_connections_per_host),
                        mailbox.max_connections_per_host)  # fmt: skip
            self._slot_limits[host] = limit

    async def poll_all(self, mailboxes: Sequence[Mailbox]) -> list[PassResult]:
        """One pass over every mailbox, concurrently; one mailbox's failure does not touch the others."""
        self.limit_hosts(mailboxes)
        return list(await asyncio.gather(*(self.poll(m) for m in mailboxes)))

    async def poll(self, mailbox: Mailbox) -> PassResult:
        """One pass over one mailbox; never raises for a failure of that mailbox (see CONTAINED)."""
        progress = _Progress()
        try:
            await self._drain(mailbox, progress)
        except CONTAINED as exc:
            failure = classify(exc)
            self._observe(mailbox, failure)
            if self.metrics is not None:
                self.metrics.poll_failed(mailbox.id, failure.state)
            return progress.result(mailbox.id, failure)
        self._observe(mailbox, None)
        if self.metrics is not None:
            self.metrics.poll_succeeded(mailbox.id, self.clock())
        if self.tracker is not None:
            self.tracker.progressed()
        return progress.result(mailbox.id)

    def _observe(self, mailbox: Mailbox, failure: Failure | None) -> None:
        change = self.states.observe(mailbox.id, failure)
        if change is not None:
            log.log(logging.INFO if change.quiet else logging.WARNING, "%s", change.message())
        elif failure is not None:
            log.debug("mailbox %s: still %s: %s", mailbox.id, failure.state, failure.reason)

    async def _drain(self, mailbox: Mailbox, progress: _Progress) -> None:
        self._warn_tls_once(mailbox)
        while await self._session(mailbox, progress):
            pass

    def _warn_tls_once(self, mailbox: Mailbox) -> None:
        if not mailbox.verify_tls and mailbox.tls != "none" and mailbox.id not in self._tls_warned:
            self._tls_warned.add(mailbox.id)
            log.warning(
                "mailbox %s: TLS certificate and host name verification is OFF (verify_tls = false): "
                "anyone on the path to %s can read the password and the mail", mailbox.id, mailbox.host,
            )  # fmt: skip

    @contextlib.asynccontextmanager
    async def _slot(self, mailbox: Mailbox) -> AsyncIterator[None]:
        """One of the connections allowed to the mailbox's host."""
        host = mailbox.host.lower()
        slot = self._slots.get(host)
        if slot is None:
            limit = self._slot_limits.setdefault(host, mailbox.max_connections_per_host)
            slot = self._slots[host] = asyncio.Semaphore(limit)
        async with slot:
            yield

    async def _session(self, mailbox: Mailbox, progress: _Progress) -> bool:
        """One POP3 session of a pass; True when the pass should reconnect at once for more work."""
        secret = await session_secret(mailbox, self.environ)
        async with self._slot(mailbox):
            client = await self._timed("CONNECT", self._connect(mailbox))
            async with client:
                await self._timed(AUTH_VERBS[mailbox.auth], authenticate(client, mailbox, secret))
                login_delay = (await client.capabilities()).login_delay  # re-read after login (RFC 2449)
                progress.login_delay = float(login_delay) if login_delay else None
                if self.before_plan is not None:
                    await self.before_plan(mailbox)
                part, more = self._plan(mailbox, await self._listing(client), progress)
                deleted = await self._delete(client, part.delete_only)
                deleted += await self._publish_all(client, mailbox, part, progress)
                await self._timed("QUIT", client.quit())
        progress.deleted += deleted
        progress.sessions += 1
        return more

    async def _connect(self, mailbox: Mailbox) -> Pop3Client:
        context = tls_context(mailbox.ca_file, verify=mailbox.verify_tls) if mailbox.tls != "none" else None
        return await Pop3Client.connect(
            mailbox.host, mailbox.effective_port, tls=mailbox.tls, ssl_context=context,
            timeout=mailbox.timeout,
        )  # fmt: skip

    async def _listing(self, client: Pop3Client) -> list[Listed]:
        uidls = await self._timed("UIDL", client.uidl())
        sizes = await self._timed("LIST", client.list())
        return [Listed(n, uidls[n], sizes.get(n, 0)) for n in sorted(uidls)]

    def _plan(self, mailbox: Mailbox, listing: list[Listed], progress: _Progress) -> tuple[Plan, bool]:
        plan = plan_pass(
            listing, self.memory.known(mailbox.id), mode=mailbox.mode,
            max_message_size=mailbox.max_message_size, keep_days=mailbox.keep_days, now=self.clock(),
        )  # fmt: skip
        progress.too_big = len(plan.too_big)
        self._report_too_big(mailbox, plan.too_big)
        limit = mailbox.max_messages_per_session
        return session_part(
            plan, quit_every=mailbox.quit_every, deletes_retrieved=mailbox.mode == "delete",
            max_retrieve=None if limit is None else max(0, limit - progress.published),
        )  # fmt: skip

    def _report_too_big(self, mailbox: Mailbox, too_big: list[Listed]) -> None:
        reported = self._too_big_reported.setdefault(mailbox.id, set())
        if self.metrics is not None:
            self.metrics.oversized(mailbox.id, len(too_big), new=len({m.uidl for m in too_big} - reported))
        for message in too_big:
            if message.uidl not in reported:
                reported.add(message.uidl)
                log.warning(
                    "mailbox %s: message %s is %d bytes, over max_message_size %d: left on the server",
                    mailbox.id, message.uidl, message.size, mailbox.max_message_size,
                )  # fmt: skip

    async def _delete(self, client: Pop3Client, messages: Sequence[Listed]) -> int:
        if messages:
            await self._timed("DELE", client.dele_many([m.number for m in messages]))
        return len(messages)

    async def _publish_all(
        self, client: Pop3Client, mailbox: Mailbox, plan: Plan, progress: _Progress
    ) -> int:
        """Retrieve and publish `plan.retrieve`; returns how many were marked deleted (delete mode).

        Up to PUBLISH_AHEAD batches are with the broker while the next one is retrieved; a batch's
        DELEs go out as soon as the broker acknowledged it, between the pipelined RETRs.
        """
        groups = batches(plan.retrieve)
        in_flight: deque[asyncio.Task[list[Listed]]] = deque()
        deleted = 0
        try:
            stream = cast(Retrievals, client.retr_many([m.number for m in plan.retrieve]))
            async with contextlib.aclosing(stream):
                for group in groups:
                    batch = [(listed, await self._retrieved(stream, listed)) for listed in group]
                    in_flight.append(
                        asyncio.create_task(self._publish_batch(mailbox, batch, plan.reused, progress))
                    )
                    while in_flight and (len(in_flight) >= PUBLISH_AHEAD or in_flight[0].done()):
                        deleted += await self._acknowledged(client, mailbox, in_flight.popleft())
            while in_flight:
                deleted += await self._acknowledged(client, mailbox, in_flight.popleft())
        finally:
            await _settle(in_flight)
        return deleted

    async def _retrieved(self, stream: Retrievals, listed: Listed) -> bytes:
        started = time.perf_counter()
        number, raw = await anext(stream)
        if number != listed.number:  # pragma: no cover - retr_many yields in the order given
            raise Pop3ProtocolError(f"pop3: RETR {listed.number} answered as {number}")
        if self.metrics is not None:
            self.metrics.pop3_command("RETR").observe(time.perf_counter() - started)
        return raw

    async def _acknowledged(
        self, client: Pop3Client, mailbox: Mailbox, task: asyncio.Task[list[Listed]]
    ) -> int:
        published = await task
        if mailbox.mode != "delete":
            return 0
        return await self._delete(client, published)

    async def _publish_batch(
        self, mailbox: Mailbox, batch: list[tuple[Listed, bytes]], reused: frozenset[str], progress: _Progress
    ) -> list[Listed]:
        now = self.clock()
        events = [self._event(mailbox, listed, raw, now, listed.uidl in reused) for listed, raw in batch]
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
        for record, event in zip(records, events, strict=True):
            self.memory.remember(record)
            if self.metrics is not None:
                self.metrics.fetched(mailbox.id, event.size)
            log.info("mailbox %s: published uidl=%s fetch_id=%s", mailbox.id, record.uidl, record.fetch_id)
        progress.published += len(batch)
        return [listed for listed, _ in batch]

    @staticmethod
    def _event(mailbox: Mailbox, listed: Listed, raw: bytes, now: datetime, reused: bool) -> MailFetched:
        sha256 = hashlib.sha256(raw).hexdigest()
        if reused:
            log.info(
                "mailbox %s: uidl %s was reused by the server for another message", mailbox.id, listed.uidl
            )
        return MailFetched(
            fetch_id=fetch_id_of(mailbox.id, listed.uidl, sha256, reused=reused),
            mailbox_id=mailbox.id,
            pop3_host=mailbox.host,
            uidl=listed.uidl,
            size=len(raw),
            sha256=sha256,
            fetched_at=now,
            raw=raw,
        )

    async def _timed(self, verb: str, awaitable: Awaitable[_T]) -> _T:
        if self.metrics is None:
            return await awaitable
        with self.metrics.pop3_command(verb).time():
            return await awaitable


async def _settle(tasks: deque[asyncio.Task[list[Listed]]]) -> None:
    """After a failure: let the batches already with the broker finish, so what was published is
    remembered (and deleted on the next pass) rather than published again."""
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
