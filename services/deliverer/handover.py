"""The batch a deliverer consumer loop has in hand, and what a rebalance does with it.

A loop fetches a batch, hands its copies to the SMTP server, publishes what followed and commits. A
rebalance that takes the batch's partitions away (a replica joins or leaves, a retry tier's consumer
closes) awaits `Handover.revoked` before the group gives them to another member: it waits for the batch to
finish (up to FINISH_TIMEOUT), commits it while this member still owns the partitions, and only then lets
them go. The next owner starts after the batch, so a rebalance without a kill delivers nothing twice.

Only time while the broker is reachable counts towards FINISH_TIMEOUT: a batch waiting for the broker to
take its outcomes would only be abandoned and its copies sent again by the next owner, and no member moves
on while the broker is away anyway. A batch still running after FINISH_TIMEOUT is abandoned: cancelled and
not committed. The next owner reads it again and the ledger skips the copies this member recorded; a copy
cut off in the middle of its SMTP transaction may arrive twice, as after a kill.

Each partition of a batch is committed once, by whichever comes first (the loop or the revocation), and
only while this member owns it: committing a partition no longer assigned is aiokafka's IllegalStateError.
A commit the group refuses anyway (the member was dropped, the generation moved on) is one log line: the
records are read again by their new owner and the ledger absorbs them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from services.runtime.log import REVOKE_TIMEOUT, LogConsumer, LogError, Record, TopicPartition
from services.runtime.outage import BROKER

log = logging.getLogger("popbridge.deliverer")

FINISH_TIMEOUT = REVOKE_TIMEOUT * 0.75  # leaves the revocation time to commit before the group moves on
CHECK_EVERY = 1.0  # seconds between two looks at the broker while a revocation waits for the batch


def broker_reachable() -> bool:
    """Whether this process sees the broker now (services.runtime.outage)."""
    return not BROKER.down


@dataclass(eq=False)
class Batch:
    """One batch being handled: its task and, per partition, the offset to commit not committed yet."""

    pending: dict[TopicPartition, int]
    task: asyncio.Future[object]
    abandoned: bool = False


@dataclass
class Handover:
    """`on_revoked` of one deliverer consumer, and the loop's way to run and commit a batch."""

    name: str
    timeout: float = FINISH_TIMEOUT
    consumer: LogConsumer | None = None
    current: Batch | None = None
    reachable: Callable[[], bool] = broker_reachable  # the wait counts only while this says True
    check_every: float = CHECK_EVERY
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def owned(self, records: Sequence[Record]) -> list[Record]:
        """The records of partitions still assigned: a fetch that raced a revocation may return records of
        partitions being handed over; they are left to their next owner."""
        if self.consumer is None or not records:
            return list(records)
        assigned = self.consumer.assignment()
        return [r for r in records if r.tp in assigned]

    async def run(
        self, offsets: Mapping[TopicPartition, int], handle: Callable[[], Awaitable[object]]
    ) -> None:
        """Handle one batch, then commit `offsets` for the partitions a revocation did not settle."""
        batch = Batch(dict(offsets), asyncio.ensure_future(handle()))
        self.current = batch
        try:
            try:
                await batch.task  # cancelling the loop cancels the batch
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if batch.abandoned and current is not None and not current.cancelling():
                    return  # abandoned by `revoked`: nothing to commit
                raise
            assigned = self.consumer.assignment() if self.consumer is not None else set(batch.pending)
            await self._commit(batch, assigned)
        finally:
            if self.current is batch:
                self.current = None

    async def revoked(self, tps: set[TopicPartition]) -> None:
        """Finish (or abandon) the batch holding any of `tps`, and commit it, before they move."""
        batch = self.current
        if batch is None or not tps & batch.pending.keys():
            return
        started = asyncio.get_running_loop().time()
        done = await self._finished(batch.task)
        waited = asyncio.get_running_loop().time() - started
        if waited >= 1.0:  # the whole group waited with this member (its JoinGroup comes after this)
            log.info("deliverer %s: rebalance waited %.1f s for the batch in hand", self.name, waited)
        if not done:
            log.warning("deliverer %s: batch still running %.0f s into a rebalance (the broker reachable): "
                        "abandoned, not committed", self.name, self.timeout)
            batch.abandoned = True
            batch.task.cancel()
            await asyncio.wait({batch.task})
            return
        if batch.task.cancelled() or batch.task.exception() is not None:
            return  # the loop sees the failure; nothing handled is committed
        await self._commit(batch, tps)

    async def _finished(self, task: asyncio.Future[object]) -> bool:
        """True once `task` is done; False after `timeout` seconds of waiting with the broker reachable."""
        counted = 0.0
        while counted < self.timeout:
            step = min(self.check_every, self.timeout - counted)
            done, _ = await asyncio.wait({task}, timeout=step)
            if done:
                return True
            if self.reachable():
                counted += step
        return False

    async def _commit(self, batch: Batch, owned: set[TopicPartition]) -> None:
        async with self._lock:
            offsets = {tp: o for tp, o in batch.pending.items() if tp in owned}
            for tp in offsets:
                del batch.pending[tp]
            if not offsets or self.consumer is None:
                return
            started = asyncio.get_running_loop().time()
            try:
                await self.consumer.commit(offsets)
                took = asyncio.get_running_loop().time() - started
                if took >= 5.0:
                    log.info("deliverer %s: commit took %.1f s", self.name, took)
            except LogError as exc:
                if not exc.retriable:
                    raise
                log.warning("deliverer %s: commit refused, the group moved on (%s): its new owner reads "
                            "those records again and the ledger skips what was delivered", self.name, exc)
