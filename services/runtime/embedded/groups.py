"""Consumer groups on the embedded log: membership, partition assignment and hand-over, committed
offsets, and the consumer.

Each consumer is a row with a heartbeat (every `member_timeout / 5`); a row older than `member_timeout` is
a dead consumer. Partitions are spread round robin over the live consumers of a group. A partition moves
only once its owner released it (at its next fetch, so after it committed what it handled; or when it
stopped fetching for MAX_POLL_INTERVAL) or died, and the new owner starts at the committed offset (a new
group at the earliest record): a rebalance skips nothing, and a stage that commits before fetching again
sees no record twice. A consumer with `on_revoked` awaits it, in that fetch, before it releases the
partitions it is losing: until the callback returned the new owner waits for them (it holds none of them
meanwhile). Consumer commits never move a committed offset backwards; `write_committed` (ops) does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from services.runtime.embedded.records import FETCH_MAX_BYTES, bounds, read_records
from services.runtime.embedded.schema import EmbeddedLogError, transaction
from services.runtime.embedded.worker import Changes, Clock, Worker
from services.runtime.log import LogError, OnRevoked, Record, TopicPartition

MEMBER_TIMEOUT = 10.0  # seconds without a heartbeat after which a consumer is dead
MAX_POLL_INTERVAL = 300.0  # a live consumer that stopped fetching this long gives its partitions up (Kafka's)
P = ParamSpec("P")
T = TypeVar("T")

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """A live consumer of a group, as `popbridge groups` shows it."""

    member_id: str
    client: str  # host:pid of the process
    topics: tuple[str, ...]
    heartbeat_ms: int
    partitions: tuple[TopicPartition, ...]


def assign(members: Mapping[str, Sequence[str]], tps: Sequence[TopicPartition]) -> dict[TopicPartition, str]:
    """Round-robin assignment (Kafka's RoundRobinAssignor): partitions in order, dealt to the members
    in id order, skipping a member not subscribed to the partition's topic."""
    order = sorted(members)
    ring = itertools.cycle(order)
    result: dict[TopicPartition, str] = {}
    for tp in sorted(tps):
        if any(tp.topic in members[m] for m in order):
            result[tp] = next(m for m in ring if tp.topic in members[m])
    return result


@dataclass(eq=False)
class GroupMember:
    """The state of one consumer; lives on (and is only touched by) its worker thread."""

    group: str
    topics: tuple[str, ...]
    clock: Clock
    timeout_ms: int
    member_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    version: int = -1  # the group version this member last synced with
    positions: dict[TopicPartition, int] = field(default_factory=dict)  # owned partition -> next offset
    waiting: set[TopicPartition] = field(default_factory=set)  # assigned, but the old owner holds it still
    turn: int = 0
    bumps: int = 0  # how often this member changed the group: the consumer then wakes waiting fetches
    # With an on_revoked callback: the partitions it was called for, which may now be released; None
    # (no callback) releases every partition that moved at once.
    handed_over: set[TopicPartition] | None = None
    moving: set[TopicPartition] = field(default_factory=set)  # owned, assigned elsewhere, still held
    paused: set[TopicPartition] = field(default_factory=set)  # owned, not fetched until resumed

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def sync(self, conn: sqlite3.Connection, *, release: bool = True, force: bool = False) -> None:
        """Heartbeat, drop dead members, and release/claim partitions to match the assignment.

        `release=False` (a heartbeat while records are being handled) keeps partitions that moved to
        another member until the next fetch, so they move only after their records were committed.
        With an on_revoked callback only the partitions `handed_over` are released, unless `force`
        (a stalled member)."""
        with transaction(conn):
            changed = self._heartbeat(conn)
            desired, owners = self._desired(conn), self._owners(conn)
            to_release = [tp for tp, m in owners.items() if m == self.member_id and desired.get(tp) != m]
            to_claim = [tp for tp, m in desired.items() if m == self.member_id and tp not in owners]
            releasing = [
                tp for tp in to_release
                if release and (force or self.handed_over is None or tp in self.handed_over)
            ]  # fmt: skip
            for tp in releasing:
                self._set_owner(conn, tp, None)
                del owners[tp]
            for tp in to_claim:
                self._set_owner(conn, tp, self.member_id)
                owners[tp] = self.member_id
            if changed or to_claim or releasing:
                conn.execute("UPDATE groups SET version = version + 1 WHERE group_id = ?", (self.group,))
                self.bumps += 1
            self._take(conn, owners, desired)
            self.moving = set(to_release) - set(releasing)
            if self.handed_over is not None:
                self.handed_over &= self.moving  # released, or assigned back to this member
            self.version = -1 if self.moving else self._group_version(conn)

    def _desired(self, conn: sqlite3.Connection) -> dict[TopicPartition, str]:
        """Who should own each partition the live members of the group subscribe to."""
        members = {
            m: json.loads(t)
            for m, t in conn.execute(
                "SELECT member_id, topics FROM members WHERE group_id = ?", (self.group,)
            )
        }
        subscribed = {t for topics in members.values() for t in topics}
        tps = [TopicPartition(t, p) for t, p in conn.execute("SELECT topic, part FROM partitions")]
        return assign(members, [tp for tp in tps if tp.topic in subscribed])

    def _owners(self, conn: sqlite3.Connection) -> dict[TopicPartition, str]:
        rows = conn.execute("SELECT topic, part, member_id FROM owners WHERE group_id = ?", (self.group,))
        return {TopicPartition(t, p): m for t, p, m in rows}

    def _set_owner(self, conn: sqlite3.Connection, tp: TopicPartition, member_id: str | None) -> None:
        key = (self.group, tp.topic, tp.partition)
        conn.execute("DELETE FROM owners WHERE group_id = ? AND topic = ? AND part = ?", key)
        if member_id is not None:
            conn.execute("INSERT INTO owners VALUES (?, ?, ?, ?)", (*key, member_id))

    def _heartbeat(self, conn: sqlite3.Connection) -> bool:
        """Refresh this member's row and delete the dead ones; True when membership changed."""
        now = self.now_ms()
        conn.execute("INSERT INTO groups (group_id) VALUES (?) ON CONFLICT DO NOTHING", (self.group,))
        expired = conn.execute(
            "DELETE FROM members WHERE group_id = ? AND heartbeat_ms < ? AND member_id != ?",
            (self.group, now - self.timeout_ms, self.member_id),
        ).rowcount
        # A member whose process on this machine is gone (kill -9) is dead now, not after the timeout:
        # a restarted `popbridge run` takes its partitions back at once.
        others = conn.execute(
            "SELECT member_id, client FROM members WHERE group_id = ? AND member_id != ?",
            (self.group, self.member_id),
        ).fetchall()
        for member_id, client in others:
            if process_gone(client):
                expired += conn.execute(
                    "DELETE FROM members WHERE group_id = ? AND member_id = ?", (self.group, member_id)
                ).rowcount
        conn.execute(
            "DELETE FROM owners WHERE group_id = ?1 AND member_id NOT IN"
            " (SELECT member_id FROM members WHERE group_id = ?1)",
            (self.group,),
        )
        updated = conn.execute(
            "UPDATE members SET heartbeat_ms = ? WHERE group_id = ? AND member_id = ?",
            (now, self.group, self.member_id),
        ).rowcount
        if not updated:  # joining, or rejoining after others took this member for dead
            conn.execute(
                "INSERT INTO members VALUES (?, ?, ?, ?, ?)",
                (self.group, self.member_id, _client(), json.dumps(self.topics), now),
            )
        return bool(expired or not updated)

    def _take(
        self, conn: sqlite3.Connection, owners: dict[TopicPartition, str], desired: dict[TopicPartition, str]
    ) -> None:
        owned = {tp for tp, m in owners.items() if m == self.member_id}
        self.waiting = {tp for tp, m in desired.items() if m == self.member_id} - owned
        self.positions = {
            tp: self.positions[tp] if tp in self.positions else self._start(conn, tp) for tp in owned
        }
        self.paused &= owned  # a partition that moved away and back is read afresh

    def _start(self, conn: sqlite3.Connection, tp: TopicPartition) -> int:
        """Where a newly owned partition is read from: the committed offset, else the earliest record."""
        log_start, log_end = bounds(conn, tp)
        row = conn.execute(
            "SELECT next_offset FROM committed WHERE group_id = ? AND topic = ? AND part = ?",
            (self.group, tp.topic, tp.partition),
        ).fetchone()
        return log_start if row is None else min(max(row[0], log_start), log_end)

    def _group_version(self, conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT version FROM groups WHERE group_id = ?", (self.group,)).fetchone()
        return -1 if row is None else int(row[0])

    def refresh(self, conn: sqlite3.Connection) -> None:
        if self._group_version(conn) != self.version:
            self.sync(conn)

    def revoking(self, conn: sqlite3.Connection) -> set[TopicPartition]:
        """The partitions this member holds that the group now assigns to another one, not handed over yet
        (only with an on_revoked callback)."""
        self.refresh(conn)
        return self.moving - (self.handed_over or set())

    def hand_over(self, conn: sqlite3.Connection, tps: set[TopicPartition]) -> None:
        """on_revoked returned for `tps`: release them (those still moving)."""
        if self.handed_over is not None:
            self.handed_over |= tps
        self.sync(conn)

    def poll(self, conn: sqlite3.Connection, max_records: int) -> list[Record]:
        self.refresh(conn)
        owned = sorted(self.positions.keys() - self.paused)
        if not owned:
            return []
        self.turn += 1  # start at a different partition each time, so none starves
        order = owned[self.turn % len(owned) :] + owned[: self.turn % len(owned)]
        records: list[Record] = []
        size = 0
        for tp in order:
            if len(records) >= max_records or size >= FETCH_MAX_BYTES:
                break
            room = max_records - len(records), FETCH_MAX_BYTES - size
            batch = read_records(conn, tp, self.positions[tp], *room)
            if batch:
                self.positions[tp] = batch[-1].offset + 1
                records += batch
                size += sum(len(r.value) for r in batch)
        return records

    def pause_at(self, conn: sqlite3.Connection, tp: TopicPartition, offset: int) -> None:
        if tp in self.positions:
            self.positions[tp] = offset
            self.paused.add(tp)

    def resume(self, conn: sqlite3.Connection, tps: set[TopicPartition]) -> None:
        self.paused -= tps

    def caught_up(self, conn: sqlite3.Connection, ignoring: frozenset[TopicPartition] = frozenset()) -> bool:
        self.refresh(conn)
        if self.waiting or not self.positions:
            return False
        # "Nothing left to read" rather than "position == end": retention may have emptied the tail.
        return not any(
            conn.execute(
                "SELECT 1 FROM records WHERE topic = ? AND part = ? AND record_offset >= ? LIMIT 1",
                (tp.topic, tp.partition, position),
            ).fetchone()
            for tp, position in self.positions.items()
            if tp not in ignoring
        )

    def commit(self, conn: sqlite3.Connection, offsets: Mapping[TopicPartition, int]) -> None:
        with transaction(conn):
            conn.executemany(
                "INSERT INTO committed VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE"
                " SET next_offset = max(next_offset, excluded.next_offset)",
                [(self.group, tp.topic, tp.partition, offset) for tp, offset in offsets.items()],
            )

    def leave(self, conn: sqlite3.Connection) -> None:
        with transaction(conn):
            key = (self.group, self.member_id)
            conn.execute("DELETE FROM members WHERE group_id = ? AND member_id = ?", key)
            conn.execute("DELETE FROM owners WHERE group_id = ? AND member_id = ?", key)
            conn.execute("UPDATE groups SET version = version + 1 WHERE group_id = ?", (self.group,))


def _client() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def process_gone(client: str) -> bool:
    """True when `client` (host:pid) names a process of this machine that no longer runs (or is a zombie).

    Only a certain answer counts: another host, or a pid we may not signal, is left to the heartbeat
    timeout. A reused pid looks alive, which only delays the takeover to the timeout, as before.
    """
    host, _, pid = client.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state == "Z"


class EmbeddedConsumer:
    """LogConsumer of one group member on the embedded log."""

    def __init__(
        self,
        worker: Worker,
        changes: Changes,
        member: GroupMember,
        poll_interval: float,
        on_revoked: OnRevoked | None = None,
    ) -> None:
        self._worker = worker
        self._changes = changes
        self._member = member
        self._poll_interval = poll_interval
        self._on_revoked = on_revoked
        if on_revoked is not None:
            member.handed_over = set()
        self._last_fetch = time.monotonic()
        self._bumps_seen = 0

    async def fetch(self, timeout: float, max_records: int = 500) -> list[Record]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._last_fetch = time.monotonic()
            seen = self._changes.count
            if self._on_revoked is not None:
                await self._hand_over(self._on_revoked)
            records = await self._run(self._member.poll, max_records)
            remaining = deadline - loop.time()
            if records or remaining <= 0:
                return records
            await self._changes.wait(seen, min(self._poll_interval, remaining))

    async def _hand_over(self, on_revoked: OnRevoked) -> None:
        """Partitions that moved to another member: the callback first, then release them."""
        revoked = await self._run(self._member.revoking)
        if revoked:
            await on_revoked(set(revoked))
            await self._run(self._member.hand_over, revoked)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if offsets:
            await self._worker.run(self._member.commit, offsets)

    async def caught_up(self, ignoring: Collection[TopicPartition] = ()) -> bool:
        return await self._run(self._member.caught_up, frozenset(ignoring))

    async def pause_at(self, tp: TopicPartition, offset: int) -> None:
        await self._worker.run(self._member.pause_at, tp, offset)

    async def resume(self, tps: Collection[TopicPartition]) -> None:
        await self._worker.run(self._member.resume, set(tps))

    def assignment(self) -> set[TopicPartition]:
        return set(self._member.positions)  # the partitions this member owns, as of its last fetch

    async def _run(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run member work; when it changed the group (released, claimed), wake the other fetches."""
        result = await self._worker.run(fn, *args, **kwargs)
        if self._member.bumps != self._bumps_seen:
            self._bumps_seen = self._member.bumps
            self._changes.notify()
        return result

    async def join(self) -> None:
        await self._run(self._member.sync)

    async def heartbeat_forever(self, interval: float, stalled_after: float) -> None:
        """Keep the membership alive while records are handled; a member that stopped fetching for
        `stalled_after` seconds gives its partitions up (Kafka's max.poll.interval.ms)."""
        while True:
            await asyncio.sleep(interval)
            stalled = time.monotonic() - self._last_fetch > stalled_after
            try:
                await self._run(self._member.sync, release=stalled, force=stalled)
            except LogError as exc:
                _logger.warning("embedded log heartbeat failed, retrying: %s", exc)


# --- for the ops commands, run on a worker thread ---------------------------------------------------


def read_committed(conn: sqlite3.Connection, group: str, topic: str) -> dict[int, int]:
    rows = conn.execute(
        "SELECT part, next_offset FROM committed WHERE group_id = ? AND topic = ? ORDER BY part",
        (group, topic),
    )
    return dict(rows.fetchall())


def live_clients(conn: sqlite3.Connection, group: str, alive_since_ms: int) -> list[str]:
    rows = conn.execute(
        "SELECT client FROM members WHERE group_id = ? AND heartbeat_ms >= ? ORDER BY client",
        (group, alive_since_ms),
    )
    return [client for (client,) in rows]


def write_committed(
    conn: sqlite3.Connection, group: str, offsets: Mapping[TopicPartition, int], alive_since_ms: int
) -> dict[TopicPartition, int]:
    result: dict[TopicPartition, int] = {}
    with transaction(conn):
        clients = live_clients(conn, group, alive_since_ms)
        if clients:
            raise EmbeddedLogError(
                f"group {group!r} has {len(clients)} live consumer(s) ({', '.join(clients)}):"
                " stop them before moving its offsets",
                retriable=False,
            )
        for tp, offset in sorted(offsets.items()):
            log_start, log_end = bounds(conn, tp)
            result[tp] = min(max(offset, log_start), log_end)
            conn.execute(
                "INSERT INTO committed VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO UPDATE SET next_offset = excluded.next_offset",
                (group, tp.topic, tp.partition, result[tp]),
            )
    return result


def list_groups(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute("SELECT group_id FROM committed UNION SELECT group_id FROM members ORDER BY 1")
    return [group for (group,) in rows]


def list_active_members(conn: sqlite3.Connection, group: str, alive_since_ms: int) -> list[Member]:
    rows = conn.execute(
        "SELECT member_id, client, topics, heartbeat_ms FROM members"
        " WHERE group_id = ? AND heartbeat_ms >= ? ORDER BY member_id",
        (group, alive_since_ms),
    ).fetchall()
    owned: dict[str, list[TopicPartition]] = {}
    for topic, part, member in conn.execute(
        "SELECT topic, part, member_id FROM owners WHERE group_id = ? ORDER BY topic, part", (group,)
    ):
        owned.setdefault(member, []).append(TopicPartition(topic, part))
    return [
        Member(member_id, client, tuple(json.loads(topics)), heartbeat, tuple(owned.get(member_id, ())))
        for member_id, client, topics, heartbeat in rows
    ]
