"""Mailbox sharing among fetcher replicas: stay in the assignment group, follow what it assigns, and bring
the memory of a gained mailbox up to date before planning it (see services.fetcher.placement).

A replica holds its membership from its own task (`hold_assignment`), calling `fetch` every
ASSIGNMENT_CHECK seconds, so a long POP3 pass never delays heartbeats or a rebalance. A replica that dies
is dropped by the group after the session timeout (6 s, services.runtime.log.GROUP_SESSION_TIMEOUT) and
its partitions, so its mailboxes, go to the survivors.

A graceful rebalance (a replica joins or leaves) hands a mailbox over without two replicas ever polling it
at once: the assignment consumer's `on_revoked` (`Handover.revoked`) runs inside the rebalance, before the
group gives the partition to another replica. It marks the mailboxes of the revoked partitions not owned
(services.fetcher.commands.poll_forever checks ownership before each pass, so none starts again) and waits
for their passes in progress (`Passes`) to end, aborting one still running after HANDOVER_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from services.fetcher.fetch_state import FetchMemory
from services.fetcher.placement import Change, Ownership
from services.runtime.log import REVOKE_TIMEOUT, LogConsumer, LogError, TopicPartition
from services.runtime.outage import BROKER
from services.runtime.settings import Mailbox

log = logging.getLogger("popbridge.fetcher")

ASSIGNMENT_CHECK = 1.0  # seconds between fetches of the assignment topic: heartbeats and rebalances noticed
HANDOVER_TIMEOUT = REVOKE_TIMEOUT / 2  # a revoked mailbox's pass still running after this is aborted

T = TypeVar("T")


async def hold_assignment(
    consumer: LogConsumer, topic: str, ownership: Ownership, every: float = ASSIGNMENT_CHECK
) -> None:
    """Keep this replica in the group and `ownership` current, until cancelled."""
    while True:
        try:
            await consumer.fetch(every)  # the topic carries no records: this waits `every` seconds
        except LogError as exc:
            if exc.retriable:  # the broker away: within the outage's bound of lines, not one a second
                BROKER.failed(f"mailbox assignment: fetch failed, retrying: {exc}")
            else:
                log.warning("mailbox assignment: fetch failed, retrying: %s", exc)
            await asyncio.sleep(every)
        change = ownership.update({tp.partition for tp in consumer.assignment() if tp.topic == topic})
        if change:
            _log_change(ownership, change)


class Passes:
    """The passes in progress on this replica, by mailbox, so that a rebalance can wait for them."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Task[Any]] = {}

    def running(self, mailbox_id: str) -> bool:
        return mailbox_id in self._running

    async def run(self, mailbox_id: str, pass_: Coroutine[Any, Any, T]) -> T | None:
        """Run one pass of `mailbox_id`; None when `finish` aborted it. Registered before the first await,
        so a pass started right after an ownership check is always seen by `finish`."""
        task = asyncio.create_task(pass_, name=f"pass {mailbox_id}")
        self._running[mailbox_id] = task
        try:
            return await task  # cancelling the caller cancels the pass, and waits for it
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                return None  # aborted by `finish`, not a cancellation of the caller
            raise
        finally:
            if self._running.get(mailbox_id) is task:
                del self._running[mailbox_id]

    async def finish(self, mailbox_ids: Collection[str], timeout: float) -> None:
        """Wait until no pass of `mailbox_ids` runs; abort the ones still running after `timeout`."""
        tasks = {self._running[m] for m in mailbox_ids if m in self._running}
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=timeout)
        for task in late:
            log.warning(
                "mailbox assignment: %s still running after %.0f s: aborted", task.get_name(), timeout
            )
            task.cancel()
        if late:
            await asyncio.wait(late)


@dataclass
class Handover:
    """`on_revoked` of the assignment consumer: give the mailboxes of revoked partitions up, their passes
    over, before the rebalance completes and another replica gets them."""

    topic: str
    ownership: Ownership
    passes: Passes
    timeout: float = HANDOVER_TIMEOUT

    async def revoked(self, tps: set[TopicPartition]) -> None:
        lost = self.ownership.revoke({tp.partition for tp in tps if tp.topic == self.topic})
        if not lost:
            return
        _log_change(self.ownership, Change(lost=lost))
        busy = sorted(m for m in lost if self.passes.running(m))
        if busy:
            log.info(
                "mailbox assignment: waiting for the passes of %s before handing them over", ",".join(busy)
            )
        await self.passes.finish(lost, self.timeout)


def _log_change(ownership: Ownership, change: Change) -> None:
    log.info(
        "mailbox assignment: polling %d of %d mailboxes (gained %d, lost %d): %s",
        len(ownership.owned), len(ownership.mailbox_ids), len(change.gained), len(change.lost),
        ",".join(sorted(ownership.owned)),
    )  # fmt: skip


@dataclass
class MemoryRefresh:
    """`Fetcher.before_plan` for shared mailboxes: catch the memory up with the changelog once a gained
    mailbox is ours.

    It runs after login, so the previous owner's last pass is over (it QUIT, and recorded its fetches
    before that). One catch-up (the changelog's tail since this replica's checkpoint) serves every stale
    mailbox that logged in before it started; one that logged in later waits for the next one, which sees
    what was written since.
    """

    memory: FetchMemory
    ownership: Ownership
    _waiting: set[str] = field(default_factory=set, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    async def before_plan(self, mailbox: Mailbox) -> None:
        if not self.ownership.is_stale(mailbox.id):
            return
        self._waiting.add(mailbox.id)
        async with self._lock:
            if mailbox.id not in self._waiting:
                return  # a catch-up that started after this login has read its memory
            covered, self._waiting = self._waiting, set()
            try:
                read = await self.memory.catch_up()
            except BaseException:
                self._waiting |= covered  # their own before_plan tries again
                raise
            self.ownership.refreshed(covered)
        log.debug("mailbox assignment: %d records read for %d gained mailboxes", read, len(covered))
