"""The fetcher stage: drain each configured POP3 mailbox into the fetched topic.

Over 500 lines on purpose: the pass loop's never-lose-mail ordering reads in one place (pure: plan, memory).

Never lose a message: a message is deleted (delete mode) only after the broker acknowledged both its
`MailFetched` event and the `FetchRecorded` memory entry; a message published but not deleted (the
session dropped before QUIT) is deleted on the next pass without publishing again, once its bytes proved
it the same message (a server may reuse a UIDL for another message of the same size).

One pass over a mailbox is one or more POP3 sessions: a session QUITs after `quit_every` deletions and
the pass reconnects for the rest, so a dropped line loses little. Retrieval overlaps publishing: while
the broker acknowledges one batch, the next one is already being retrieved (the client lets DELEs go out
between pipelined RETRs).

Failures stay with their mailbox: `poll` turns every failure of a pass (POP3, credentials, configuration,
the log, and a bug of ours) into a `PassResult` with a state (`services.fetcher.status`) and logs only
changes of state. At most `max_parallel_mailboxes` passes run at once; every POP3 reply is bounded in
bytes and time (services.fetcher.pop3), so a hostile server costs its own mailbox its turn, no more.

Failures stay with their message too: a message the server refuses (-ERR to RETR), one larger than
`max_message_size` by the bytes actually received (LIST's claim is only a first filter), or one the log
refuses as too large is skipped, reported once, and left on the server; the rest of the batch is
published and deleted. A RETR reply that outgrows the size limit's cap (an endless body, a LIST that
under-reported) ends its session; the pass reconnects without that message (MAX_LIMIT_RECONNECTS times
at most).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TypeVar, cast

from schemas import codec
from schemas.events import FetchRecorded, MailFetched, fetch_state_key
from schemas.topics import FETCH_STATE, FETCHED, MAX_MESSAGE_BYTES
from services.fetcher.credentials import login, session_secret
from services.fetcher.fetch_state import FetchMemory
from services.fetcher.plan import (
    Listed,
    Plan,
    content_key,
    deletable,
    fetch_id_of,
    identify,
    plan_pass,
    session_part,
)
from services.fetcher.pop3 import (
    Pop3AuthError,
    Pop3Client,
    Pop3Error,
    Pop3LimitError,
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
from services.runtime.oauth2_tokens import TokenSources, oauth2_directory
from services.runtime.outage import BROKER
from services.runtime.secrets import CredentialError
from services.runtime.settings import ConfigError, DeploymentSettings, Mailbox

log = logging.getLogger("popbridge.fetcher")

Clock = Callable[[], datetime]
_T = TypeVar("_T")
Retrievals = AsyncGenerator[tuple[int, bytes | Pop3Error], None]  # what Pop3Client.retr_each is

# Publish and delete in batches: one broker round trip covers many messages, and a dropped session
# loses at most one batch of deletions (they are redone on the next pass, without republishing).
BATCH_MESSAGES = 8
BATCH_BYTES = 8 * 1024 * 1024
# Batches with the broker while the next ones are retrieved: bounds memory to about this many BATCH_BYTES
# (plus one message per batch). Small batches, many in flight: measured fastest with bench/fetch.py.
PUBLISH_AHEAD = 8

AUTH_VERBS = {"user": "PASS", "apop": "APOP", "plain": "AUTH", "xoauth2": "AUTH"}
# A RETR reply may exceed max_message_size by this much and still be read to its end (and then skipped
# in step); beyond it the session is cut, so memory stays near the limit whatever the server sends.
RETR_MARGIN = 64 * 1024
# Reconnects of one pass after a RETR reply outgrew its limits, each without the message that did.
MAX_LIMIT_RECONNECTS = 5


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
    skipped: int = 0  # refused by the server or by the log, left on the server
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
    too_big: set[str] = field(default_factory=set)  # messages by `_name`
    skipped: set[str] = field(default_factory=set)
    sessions: int = 0
    login_delay: float | None = None
    # Not to be retrieved again in this pass: UIDLs, and numbers (only after a session was cut short
    # before QUIT, so that the numbering has not changed).
    leave: set[str] = field(default_factory=set)
    leave_numbers: set[int] = field(default_factory=set)
    limit_reconnects: int = 0

    def result(self, mailbox_id: str, failure: Failure | None = None) -> PassResult:
        return PassResult(
            mailbox_id, published=self.published, deleted=self.deleted, too_big=len(self.too_big),
            skipped=len(self.skipped), error=failure.reason if failure else None,
            state=failure.state if failure else "ok",
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
        (Pop3LimitError, "limit-exceeded"),
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
            return Failure(found, reason, outage=isinstance(exc, LogError) and exc.retriable)
    if isinstance(exc, ValueError):  # LocalProtocolError: e.g. a user name POP3 cannot carry
        return Failure("config-error", reason)
    return Failure("internal-error", f"{type(exc).__name__}: {reason}")


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
    tokens: TokenSources | None = None  # built on first use from settings.data_dir
    _slots: dict[str, asyncio.Semaphore] = field(default_factory=dict, init=False, repr=False)
    _slot_limits: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    max_parallel_mailboxes: int = 16
    _parallel: asyncio.Semaphore | None = field(default=None, init=False, repr=False)
    _tls_warned: set[str] = field(default_factory=set, init=False, repr=False)
    _content_warned: set[str] = field(default_factory=set, init=False, repr=False)
    _reported: set[tuple[str, str, str]] = field(default_factory=set, init=False, repr=False)
    # Per mailbox, UIDLs whose RETR reply outgrew the size limit's cap: not retrieved again by this process.
    _oversized: dict[str, set[str]] = field(default_factory=dict, init=False, repr=False)
    # The memory of the mailboxes in a session now (read from the store at its start, dropped at its end).
    _known: dict[str, dict[str, FetchRecorded]] = field(default_factory=dict, init=False, repr=False)

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
        """One pass over one mailbox; never raises for a failure of that mailbox, not even a bug of ours
        (a state `internal-error`): only cancellation goes through."""
        if self._parallel is None:
            self._parallel = asyncio.Semaphore(self.max_parallel_mailboxes)
        progress = _Progress()
        try:
            async with self._parallel:
                await self._drain_until(mailbox, progress)
        except Exception as exc:
            failure = classify(exc)
            if not isinstance(exc, CONTAINED) and self.states.state(mailbox.id) != failure.state:
                log.error("mailbox %s: a bug in popbridge ended this pass", mailbox.id, exc_info=True)
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
        if failure is not None and failure.outage:  # a few lines a minute for all mailboxes together
            BROKER.failed(f"fetcher: mailbox {mailbox.id}: {failure.reason}")
        change = self.states.observe(mailbox.id, failure)
        if change is not None:
            log.log(logging.INFO if change.quiet else logging.WARNING, "%s", change.message())
        elif failure is not None:
            log.debug("mailbox %s: still %s: %s", mailbox.id, failure.state, failure.reason)

    async def _drain_until(self, mailbox: Mailbox, progress: _Progress) -> None:
        """The pass, abandoned at `pass_deadline` like a cancelled one: a session cut before QUIT deletes
        nothing, and what it published is deleted on the next pass."""
        try:
            async with asyncio.timeout(mailbox.pass_deadline) as deadline:
                await self._drain(mailbox, progress)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise Pop3LimitError(
                f"the pass took longer than pass_deadline ({mailbox.pass_deadline:g} s); the rest waits for "
                "the next pass", keyword="(the pass)", exceeded="time",
            ) from None  # fmt: skip

    async def _drain(self, mailbox: Mailbox, progress: _Progress) -> None:
        self._warn_tls_once(mailbox)
        while True:
            try:
                if not await self._session(mailbox, progress):
                    return
            except _MessageOverLimit as over:
                self._over_limit(mailbox, over, progress)

    def _over_limit(self, mailbox: Mailbox, over: _MessageOverLimit, progress: _Progress) -> None:
        """A RETR reply outgrew its cap or deadline: skip that message and reconnect, a few times a pass.

        The session was cut before QUIT, so the next one numbers the messages the same way."""
        progress.limit_reconnects += 1
        if progress.limit_reconnects > MAX_LIMIT_RECONNECTS:
            raise over.error
        listed, error = over.listed, over.error
        progress.leave_numbers.add(listed.number)
        if error.exceeded == "bytes":  # this message will not fit next pass either
            self._too_big(mailbox, listed, progress, f"over max_message_size {mailbox.max_message_size}")
        else:
            self._skip(mailbox, listed, progress, "too-slow", str(error))

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

    def _too_big(self, mailbox: Mailbox, listed: Listed, progress: _Progress, detail: str) -> None:
        """Found too big by its bytes: not retrieved again while this process runs (if it has a UIDL)."""
        if not listed.by_content:
            self._oversized.setdefault(mailbox.id, set()).add(listed.uidl)
        progress.too_big.add(_name(listed))
        self._report(mailbox, listed, "too-big", detail)

    def _skip(self, mailbox: Mailbox, listed: Listed, progress: _Progress, reason: str, detail: str) -> None:
        """Left on the server for the rest of this pass (by UIDL; by content it is retried in the pass)."""
        if not listed.by_content:
            progress.leave.add(listed.uidl)
        progress.skipped.add(_name(listed))
        self._report(mailbox, listed, reason, detail)

    async def _session(self, mailbox: Mailbox, progress: _Progress) -> bool:
        """One POP3 session of a pass; True when the pass should reconnect at once for more work."""
        secret = await session_secret(mailbox, self.environ, self._oauth2_tokens())
        left_before = self._left(mailbox, progress)
        async with self._slot(mailbox):
            client = await self._timed("CONNECT", self._connect(mailbox))
            async with client:
                await self._timed(AUTH_VERBS[mailbox.auth], login(client, mailbox, secret, self.tokens))
                login_delay = (await client.capabilities()).login_delay  # re-read after login (RFC 2449)
                progress.login_delay = float(login_delay) if login_delay else None
                if self.before_plan is not None:
                    await self.before_plan(mailbox)
                listing = await self._listing(mailbox, client)
                self._known[mailbox.id] = await self.memory.known(
                    mailbox.id, (m.uidl for m in listing if not m.by_content),
                    content_keys=any(m.by_content for m in listing),
                )  # fmt: skip
                try:
                    part, more = self._plan(mailbox, listing, progress)
                    deleted = await self._publish_all(client, mailbox, part, progress)
                finally:
                    del self._known[mailbox.id]  # memory stays bounded: only mailboxes in a session
                await self._timed("QUIT", client.quit())
        progress.deleted += deleted
        progress.sessions += 1
        # Reconnect only if the next session has other work: something was deleted, or more is left alone.
        return more and (deleted > 0 or self._left(mailbox, progress) > left_before)

    def _oauth2_tokens(self) -> TokenSources:
        """The tokens popbridge gets itself ([oauth2] tables), cached under the data directory."""
        if self.tokens is None:
            directory = oauth2_directory(self.settings.data_dir)
            self.tokens = TokenSources(directory, self.environ, metrics=self.metrics)
        return self.tokens

    def _left(self, mailbox: Mailbox, progress: _Progress) -> int:
        return len(progress.leave) + len(progress.leave_numbers) + len(self._oversized.get(mailbox.id, ()))

    async def _connect(self, mailbox: Mailbox) -> Pop3Client:
        context = tls_context(mailbox.ca_file, verify=mailbox.verify_tls) if mailbox.tls != "none" else None
        try:
            return await Pop3Client.connect(
                mailbox.host, mailbox.effective_port, tls=mailbox.tls, ssl_context=context,
                timeout=mailbox.timeout, max_message_bytes=mailbox.max_message_size + RETR_MARGIN,
                command_deadline=mailbox.command_deadline,
            )  # fmt: skip
        except (OverflowError, UnicodeError) as exc:  # a port out of range, a host name IDNA refuses
            raise ValueError(
                f"mailboxes[{mailbox.id}]: cannot connect to host {mailbox.host!r} port "
                f"{mailbox.effective_port}: {exc}"
            ) from None

    async def _listing(self, mailbox: Mailbox, client: Pop3Client) -> list[Listed]:
        uidls = await self._timed("UIDL", client.uidl())
        sizes = await self._timed("LIST", client.list())
        listing = identify(uidls, sizes)
        self._warn_content_identity(mailbox, sum(m.by_content for m in listing))
        return listing

    def _warn_content_identity(self, mailbox: Mailbox, count: int) -> None:
        if count and mailbox.id not in self._content_warned:
            self._content_warned.add(mailbox.id)
            cost = " and downloaded again on every pass (keep mode)" if mailbox.mode == "keep" else ""
            log.warning(
                "mailbox %s: %d message(s) without a usable UIDL (listed twice, missing, malformed or not "
                "1-70 printable characters): identified by a digest of their content%s",
                mailbox.id, count, cost,
            )  # fmt: skip

    def _plan(self, mailbox: Mailbox, listing: list[Listed], progress: _Progress) -> tuple[Plan, bool]:
        plan = plan_pass(
            listing, self._known[mailbox.id], mode=mailbox.mode,
            max_message_size=mailbox.max_message_size, keep_days=mailbox.keep_days, now=self.clock(),
            too_big_uidls=self._oversized.get(mailbox.id, ()), leave=progress.leave,
            leave_numbers=progress.leave_numbers,
        )  # fmt: skip
        progress.too_big.update(_name(m) for m in plan.too_big)
        self._report_too_big(mailbox, plan.too_big)
        limit = mailbox.max_messages_per_session
        return session_part(
            plan, quit_every=mailbox.quit_every, deletes_retrieved=mailbox.mode == "delete",
            max_retrieve=None if limit is None else max(0, limit - progress.published),
        )  # fmt: skip

    def _report_too_big(self, mailbox: Mailbox, too_big: list[Listed]) -> None:
        if self.metrics is not None:
            new = sum((mailbox.id, _name(m), "too-big") not in self._reported for m in too_big)
            self.metrics.oversized(mailbox.id, len(too_big), new=new)
        for message in too_big:
            if message.size > mailbox.max_message_size:  # the others were reported when found
                self._report(mailbox, message, "too-big", f"{message.size} bytes by LIST, over "
                             f"max_message_size {mailbox.max_message_size}")  # fmt: skip

    def _report(self, mailbox: Mailbox, message: Listed, reason: str, detail: str) -> None:
        """Report a message left on the server, once per (mailbox, message, reason) in this process."""
        name = _name(message)
        if (mailbox.id, name, reason) in self._reported:
            return
        self._reported.add((mailbox.id, name, reason))
        log.warning("mailbox %s: message %s left on the server (%s): %s", mailbox.id, name, reason, detail)
        if self.metrics is not None:
            self.metrics.messages_skipped.labels(mailbox.id, reason).inc()

    async def _delete(self, client: Pop3Client, messages: Sequence[Listed]) -> int:
        if messages:
            await self._timed("DELE", client.dele_many([m.number for m in messages]))
        return len(messages)

    async def _publish_all(
        self, client: Pop3Client, mailbox: Mailbox, plan: Plan, progress: _Progress
    ) -> int:
        """Retrieve and publish `plan.retrieve`, retrieve and check `plan.delete_only`; returns how many
        were marked deleted.

        Up to PUBLISH_AHEAD batches are with the broker while the next one is retrieved; a batch's
        DELEs go out as soon as the broker acknowledged it, between the pipelined RETRs.
        """
        in_flight: deque[asyncio.Task[list[Listed]]] = deque()
        deleted = 0
        todo = [*plan.delete_only, *plan.retrieve]
        to_check = {m.number for m in plan.delete_only}
        try:
            stream = cast(Retrievals, client.retr_each([m.number for m in todo]))
            async with contextlib.aclosing(stream):
                for group in batches(todo):
                    batch = _Batch()
                    for listed in group:
                        await self._take(
                            stream, mailbox, listed, batch, progress, published=listed.number in to_check
                        )
                    publish = self._publish_batch(mailbox, batch, plan.reused, progress)
                    in_flight.append(asyncio.create_task(publish))
                    while in_flight and (len(in_flight) >= PUBLISH_AHEAD or in_flight[0].done()):
                        deleted += await self._acknowledged(client, mailbox, in_flight.popleft())
            while in_flight:
                deleted += await self._acknowledged(client, mailbox, in_flight.popleft())
        finally:
            await _settle(in_flight)
        return deleted

    async def _take(
        self, stream: Retrievals, mailbox: Mailbox, listed: Listed, batch: _Batch, progress: _Progress,
        *, published: bool,
    ) -> None:  # fmt: skip
        """Retrieve the next message into `batch`, or skip it (reported) if it cannot be taken.

        `published`: its UIDL and size say it was published before; its digest decides."""
        started = time.perf_counter()
        try:
            number, raw = await anext(stream)
        except Pop3LimitError as exc:
            if exc.keyword != "RETR":
                raise
            raise _MessageOverLimit(listed, exc) from None
        if number != listed.number:  # pragma: no cover - retr_each yields in the order given
            raise Pop3ProtocolError(f"pop3: RETR {listed.number} answered as {number}")
        if self.metrics is not None:
            self.metrics.pop3_command("RETR").observe(time.perf_counter() - started)
        if isinstance(raw, Pop3Error):
            self._skip(mailbox, listed, progress, "refused", str(raw))
        elif len(raw) > mailbox.max_message_size:
            limit = mailbox.max_message_size
            self._too_big(
                mailbox, listed, progress, f"{len(raw)} bytes received, over max_message_size {limit}"
            )
        elif listed.by_content:
            self._take_by_content(mailbox, listed, raw, batch)
        elif published:
            self._take_published(mailbox, listed, raw, batch)
        else:
            batch.retrieved.append((listed, raw))

    def _take_published(self, mailbox: Mailbox, listed: Listed, raw: bytes, batch: _Batch) -> None:
        """Published before by UIDL and size: delete it if the digest agrees, else it is another message."""
        record = self._known[mailbox.id][listed.uidl]
        if hashlib.sha256(raw).hexdigest() == record.sha256:
            batch.durable.append(listed)
        else:
            batch.reused.add(listed.uidl)
            batch.retrieved.append((listed, raw))

    def _take_by_content(self, mailbox: Mailbox, listed: Listed, raw: bytes, batch: _Batch) -> None:
        """A message without a usable UIDL: publish it once per content; delete it once that is durable."""
        listed = replace(listed, uidl=content_key(hashlib.sha256(raw).hexdigest()))
        record = self._known[mailbox.id].get(listed.uidl)
        if record is None:
            batch.retrieved.append((listed, raw))
        elif deletable(record, mode=mailbox.mode, keep_days=mailbox.keep_days, now=self.clock()):
            batch.durable.append(listed)

    async def _acknowledged(
        self, client: Pop3Client, mailbox: Mailbox, task: asyncio.Task[list[Listed]]
    ) -> int:
        return await self._delete(client, await task)

    async def _publish_batch(
        self, mailbox: Mailbox, batch: _Batch, reused: frozenset[str], progress: _Progress
    ) -> list[Listed]:
        """Publish the batch; returns what to delete now: what the log holds durably (in keep mode only
        what was published before and is past keep_days)."""
        now = self.clock()
        reused = reused | batch.reused
        pairs = [(listed, self._event(mailbox, listed, raw, now, listed.uidl in reused))
                 for listed, raw in batch.retrieved]  # fmt: skip
        sent = await self._send_fetched(mailbox, pairs, progress)
        published = [(listed, event) for listed, event in pairs if event.fetch_id in sent]
        records = [self._record(mailbox, listed, event, now) for listed, event in published]
        topic = self.settings.topic(FETCH_STATE)
        written = await self.producer.send_all(
            [Outgoing(topic, codec.encode(r), fetch_state_key(r.mailbox_id, r.uidl)) for r in records]
        )
        await self.memory.remember(list(zip(records, written, strict=True)))
        known = self._known[mailbox.id]
        for record, (_, event) in zip(records, published, strict=True):
            known[record.uidl] = record
            if self.metrics is not None:
                self.metrics.fetched(mailbox.id, event.size)
            log.info("mailbox %s: published uidl=%s fetch_id=%s", mailbox.id, record.uidl, record.fetch_id)
        progress.published += len(published)
        taken = [listed for listed, _ in published] if mailbox.mode == "delete" else []
        return [*taken, *batch.durable]

    @staticmethod
    def _record(mailbox: Mailbox, listed: Listed, event: MailFetched, now: datetime) -> FetchRecorded:
        return FetchRecorded(
            mailbox_id=mailbox.id, uidl=event.uidl, fetch_id=event.fetch_id, size=listed.size,
            sha256=event.sha256, published_at=now,
        )  # fmt: skip

    async def _send_fetched(
        self, mailbox: Mailbox, pairs: list[tuple[Listed, MailFetched]], progress: _Progress
    ) -> set[str]:
        """Publish the events; returns the fetch ids now durable. An event the log refuses for good
        (too large) is skipped and reported; a retriable failure fails the batch."""
        events = [event for _, event in pairs]
        outgoing = {e.fetch_id: self._outgoing(e) for e in events}
        fits = [e for e in events if len(outgoing[e.fetch_id].value) + 64 <= MAX_MESSAGE_BYTES]
        try:
            await self.producer.send_all([outgoing[e.fetch_id] for e in fits])
        except LogError as exc:
            if exc.retriable:
                raise
            fits = [e for e in fits if await self._sent_alone(outgoing[e.fetch_id])]
        for listed, event in pairs:
            if event not in fits:
                self._skip(
                    mailbox, listed, progress, "unpublishable", f"the log refuses a {event.size}-byte message"
                )
        return {e.fetch_id for e in fits}

    async def _sent_alone(self, record: Outgoing) -> bool:
        try:
            await self.producer.send(record)
        except LogError as exc:
            if exc.retriable:
                raise
            return False
        return True

    def _outgoing(self, event: MailFetched) -> Outgoing:
        return Outgoing(self.settings.topic(FETCHED), codec.encode(event), event.fetch_id.encode())

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


def _name(message: Listed) -> str:
    """How reports and counts name a message: its UIDL or content key, else its number in the session."""
    return message.uidl or f"number {message.number}"


@dataclass
class _Batch:
    """One batch of a session: messages to publish, and messages by content whose publish is durable."""

    retrieved: list[tuple[Listed, bytes]] = field(default_factory=list)
    durable: list[Listed] = field(default_factory=list)
    reused: set[str] = field(default_factory=set)  # UIDLs found reused for another message of the same size


class _MessageOverLimit(Exception):  # noqa: N818 - internal signal between _take and _drain
    """The RETR reply of `listed` outgrew its byte cap or deadline; the session is over."""

    def __init__(self, listed: Listed, error: Pop3LimitError) -> None:
        super().__init__(str(error))
        self.listed = listed
        self.error = error


async def _settle(tasks: deque[asyncio.Task[list[Listed]]]) -> None:
    """After a failure: let the batches already with the broker finish, so what was published is
    remembered (and deleted on the next pass) rather than published again."""
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
