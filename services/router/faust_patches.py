"""Corrections to faust-streaming 0.15.3's offset bookkeeping, without which the router commits past
records it never routed (issue 13). Each is the least invasive change that makes the rule hold:
an input offset is committed only once every record below it was processed by an agent.

What faust gets wrong. Causes 1 and 2 were logged on the real broker with two routers (a second one
joining mid-stream: 1 of 600 mails lost in 1 of 6 runs) and are forced in
tests/integration/test_router_rebalance.py; causes 3 and 4 were found reading faust's code after a
two-router run logged a jump (cause 3). Each is pinned against faust's own consumer in
tests/unit/router/test_faust_patches.py.

1. **Resume throws away what the seek just delivered.** After a rebalance faust seeks each stream
   partition to its committed offset while its fetcher already runs (`Recovery.on_recovery_completed`),
   then calls `flow_control.resume()`, which clears every stream queue. A record delivered in between
   is dropped, the fetcher goes on with the next one, and the agent never sees it. Logged from a run
   with two routers: `perform_seek` set fetched/2 to 49, the resume dropped offset 49 (unacked), offset
   50 was routed and faust committed 51: the mail was lost. `RouterFlowControl.resume` therefore only
   lets records flow again; queues are still cleared at revocation, where faust calls `clear()` itself.
2. **A one-offset hole at the head is committed over** (faust-streaming#606, open fix PR #707):
   `Consumer._new_offset` holds back only when `min(acked) - committed > 1`, and not at all when the
   committed offset is 0 or unknown (a new group), so a dropped or in-flight record at the head is
   skipped; a longer hole stops the partition's commits for good (the stall of issue 13).
   `SafeConsumer._new_offset` commits only a run of acked offsets that starts exactly at the
   committed offset (with none committed: at the partition's first offset).
3. **A jump in delivered offsets counts as acked.** faust takes it for a compacted-topic gap
   (`_add_gap`) and marks the missing offsets, and the record after them, as processed. The router's
   inputs are neither compacted nor written in transactions, so there a jump means faust skipped
   records, or (seen in the two-router runs) a second seek reset faust's read position under a fetcher
   that had already delivered them: `SafeConsumer` lets the commit wait until they are processed.
4. **A record the agent never saw is acked.** A stream that takes a record from its queue while flow
   is suspended (a rebalance began) or that was fetched under an earlier generation skips it, and
   acks it "so the lag does not grow" (`Stream._py_aiter`). Taken just as a rebalance starts, the record
   counts as processed and the revocation's commit passes it. `SafeConsumer.ack` releases such a
   record without counting its offset: it is read again (by this worker or the partition's new owner).

A hole no record in flight explains (records dropped by some path not covered above) would hold the
partition's commits forever; `SafeConsumer` heals it by seeking back to the committed offset, so the
records are read again. Repeats are harmless (dedupe re-emits the same copy, the deliverer's ledger
keeps it from being delivered twice); a skipped record would be a lost mail.

These are subclasses wired in by `RouterApp` (services.router.app), not edits of faust's files: the
pinned version stays as released, and each override is tested against faust's own behaviour
(tests/unit/router/test_faust_patches.py) so an upgrade that fixes faust shows which can go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import faust
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport
from faust.types import TP, Message
from faust.types.tuples import ack_lock
from mode.utils.futures import notify
from mode.utils.queues import FlowControlEvent

log = logging.getLogger("popbridge.router")

HEAL_AGAIN_AFTER = 30.0  # seconds before a hole the last seek-back did not fill is sought back again


def contiguous_end(start: int, acked: Sequence[int]) -> tuple[int, int]:
    """Where the run of processed offsets that begins at `start` ends, and how many leading entries of
    the sorted `acked` it used up (offsets below `start` were committed before: stale, used up too).

    `start` is the next offset to commit from; the result `end` is the new offset to commit, `end ==
    start` when `start` itself is not processed yet."""
    end = start
    used = 0
    for offset in acked:
        if offset > end:
            break
        if offset == end:
            end += 1
        used += 1
    return end, used


class RouterFlowControl(FlowControlEvent):
    """faust's flow control, except that resuming keeps what the queues hold (cause 1 above)."""

    def resume(self) -> None:
        self._suspend.clear()
        self._resume.set()


class SafeConsumer(AIOKafkaConsumer):
    """faust's aiokafka consumer that commits only offsets every record below was processed for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start_offset: dict[TP, int] = {}  # where reading began after the last seek to the commits
        self._healing: dict[TP, tuple[int, float]] = {}  # partition -> (offset sought back to, when)
        self._seeks: set[asyncio.Future[None]] = set()

    async def seek_to_committed(self) -> Mapping[TP, int]:
        committed: Mapping[TP, int] = await super().seek_to_committed()
        # Reading starts at the committed offset, or at the log's start when there is none or retention
        # deleted it (Kafka then resets to the earliest): below that start there is nothing to wait for.
        earliest = await self.earliest_offsets(*committed) if committed else {}
        for tp, offset in committed.items():
            known = offset if offset is not None and offset >= 0 else 0
            self._start_offset[tp] = max(known, earliest.get(tp, 0))
            self._healing.pop(tp, None)
        return committed

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        for tp in revoked:
            self._start_offset.pop(tp, None)
            self._healing.pop(tp, None)
        await super().on_partitions_revoked(revoked)

    def ack(self, message: Message) -> bool:
        if self._seen_by_agent(message):
            return bool(super().ack(message))
        # Skipped by the stream (cause 4): done with, but not processed, so its offset stays uncommitted.
        with ack_lock:
            message.acked = True
            self._unacked_messages.discard(message)
            notify(self._waiting_for_ack)
        return False

    def _seen_by_agent(self, message: Message) -> bool:
        """False for the records faust's stream skips, judged as the stream judges them, at the moment
        it acks them: flow suspended, or fetched under an earlier rebalance generation. A record an
        agent did process but finished only after a rebalance began is judged skipped too; it is read
        again, a repeat the ledger absorbs."""
        app = self.app
        return bool(app.flow_control.is_active()) and message.generation_id == app.consumer_generation_id

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        # faust would count offset_from..offset_to as processed (cause 3); the commit waits for them
        # instead. Mostly they were delivered already and faust's read position was reset under its
        # fetcher by a second seek; a real hole is found (and reported) by _heal_hole.
        log.debug("%s/%d: offsets from %d to %d out of order", tp.topic, tp.partition, offset_from, offset_to)

    def _new_offset(self, tp: TP) -> int | None:
        acked: list[int] = self._acked[tp]
        if not acked or tp not in self._start_offset:
            return None  # nothing done, or not sought yet: no offset to count from
        committed = self._committed_offset[tp]  # faust keeps None for "nothing committed" and for 0
        start = max(committed or 0, self._start_offset[tp])
        acked.sort()
        end, used = contiguous_end(start, acked)
        self._acked_index[tp].difference_update(acked[:used])
        del acked[:used]
        if end > start:
            self._healing.pop(tp, None)
            return end
        if acked:
            self._heal_hole(tp, start, acked[0])
        return None

    def _heal_hole(self, tp: TP, start: int, first_acked: int) -> None:
        """Records start..first_acked-1 are not processed while later ones are: wait if they are in
        flight, otherwise they were dropped, and reading goes back to `start` for them."""
        if any(m.tp == tp and start <= m.offset < first_acked for m in self._unacked_messages):
            return
        now = time.monotonic()
        sought = self._healing.get(tp)
        if sought is not None and sought[0] == start and now - sought[1] < HEAL_AGAIN_AFTER:
            return
        self._healing[tp] = (start, now)
        log.warning(
            "records %s/%d offsets %d..%d were dropped before processing; reading them again",
            tp.topic, tp.partition, start, first_acked - 1,
        )
        task = asyncio.ensure_future(self._seek_back(tp, start))
        self._seeks.add(task)
        task.add_done_callback(self._seeks.discard)

    async def _seek_back(self, tp: TP, offset: int) -> None:
        try:
            await self.seek(tp, offset)
        except Exception as exc:  # the partition moved meanwhile: its new owner reads from the commit
            log.warning("could not read %s/%d again from %d: %s", tp.topic, tp.partition, offset, exc)


class SafeTransport(AIOKafkaTransport):
    """faust's aiokafka transport, creating SafeConsumer (faust's _new_consumer asks the transport)."""

    Consumer = SafeConsumer


class RouterApp(faust.App):
    """faust.App with the corrected consumer and flow control."""

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return RouterFlowControl(loop=self.loop)

    def _new_transport(self) -> SafeTransport:
        # faust's own resolves the broker URL's scheme; the router's broker is always kafka://.
        return SafeTransport(self.conf.broker_consumer, self)
