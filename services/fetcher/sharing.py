"""Mailbox sharing among fetcher replicas: stay in the assignment group, follow what it assigns, and bring
the memory of a gained mailbox up to date before planning it (see services.fetcher.placement).

A replica holds its membership from its own task (`hold_assignment`), calling `fetch` every
ASSIGNMENT_CHECK seconds, so a long POP3 pass never delays heartbeats or a rebalance. A replica that dies
is dropped by the group after the session timeout (aiokafka's 10 s default) and its partitions, so its
mailboxes, go to the survivors. A revoked mailbox's pass in progress is finished, then not started again
(services.fetcher.commands.poll_forever checks ownership before each pass).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from schemas import codec
from schemas.events import FetchRecorded
from services.fetcher.memory import FetchMemory
from services.fetcher.placement import Change, Ownership
from services.runtime.log import LogConsumer, LogError, Record
from services.runtime.settings import Mailbox

log = logging.getLogger("popbridge.fetcher")

ASSIGNMENT_CHECK = 1.0  # seconds between fetches of the assignment topic: heartbeats and rebalances noticed


async def hold_assignment(
    consumer: LogConsumer, topic: str, ownership: Ownership, every: float = ASSIGNMENT_CHECK
) -> None:
    """Keep this replica in the group and `ownership` current, until cancelled."""
    while True:
        try:
            await consumer.fetch(every)  # the topic carries no records: this waits `every` seconds
        except LogError as exc:
            log.warning("mailbox assignment: fetch failed, retrying: %s", exc)
            await asyncio.sleep(every)
        change = ownership.update({tp.partition for tp in consumer.assignment() if tp.topic == topic})
        if change:
            _log_change(ownership, change)


def _log_change(ownership: Ownership, change: Change) -> None:
    log.info(
        "mailbox assignment: polling %d of %d mailboxes (gained %d, lost %d): %s",
        len(ownership.owned), len(ownership.mailbox_ids), len(change.gained), len(change.lost),
        ",".join(sorted(ownership.owned)),
    )  # fmt: skip


class StateLog(Protocol):
    """What MemoryRefresh needs of the log (services.runtime.log.Log has it)."""

    def scan(self, topic: str) -> AsyncIterator[Record]:
        """Every record of `topic`, from its beginning to its end at the time of the call."""
        ...


@dataclass
class MemoryRefresh:
    """`Fetcher.before_plan` for shared mailboxes: re-read a gained mailbox's memory once it is ours.

    It runs after login, so the previous owner's last pass is over (it QUIT, and recorded its fetches
    before that). One scan of the fetch-state topic serves every stale mailbox that logged in before the
    scan started; one that logged in later waits for the next scan, which sees what was written since.
    """

    log_: StateLog
    topic: str  # the fetch-state topic
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
                return  # a scan that started after this login has read its memory
            covered, self._waiting = self._waiting, set()
            try:
                records = [codec.decode(r.value, FetchRecorded) async for r in self.log_.scan(self.topic)]
            except BaseException:
                self._waiting |= covered  # their own before_plan scans again
                raise
            for record in records:
                if record.mailbox_id in covered:
                    self.memory.remember(record)
            self.ownership.refreshed(covered)
        log.debug("mailbox assignment: memory of %d gained mailboxes re-read", len(covered))
