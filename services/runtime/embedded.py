"""The embedded log: the log interface (services.runtime.log) on one SQLite file, for a one-machine install.

Everything lives in `<data_dir>/log.sqlite3`, in WAL mode, so readers never block the writer and several
processes (the three stages, an ops command) can share it. Blocking SQLite calls run on one dedicated
thread per producer or consumer, each thread holding its own connection.

Durability: an append is one SQLite transaction, committed before `send` returns. With WAL, COMMIT has
write()n the frames to the -wal file before it returns, so a kill -9 of the process cannot lose them
(the kernel holds those pages): `synchronous=NORMAL` would be enough for that. The default is `FULL`,
which also fsyncs the WAL at every commit, so a power cut cannot lose a record either: on one office
machine there is no replica, and the fetcher deletes the mail from the POP3 server once `send` returned.
Concurrent sends on one producer are committed together (group commit) to share that fsync.

Semantics follow Kafka: a key picks its partition by a stable hash (crc32) modulo the partition count,
keyless records go round robin; offsets start at 0 per partition; timestamps are append time in ms (never
decreasing within a partition); a new group starts at the earliest record. `max.message.bytes` is
enforced, and a compacted topic refuses keyless records, as the broker does.

Consumer groups: each consumer is a row with a heartbeat (every `member_timeout / 5`); a row older than
`member_timeout` is a dead consumer. Partitions are spread round robin over the live consumers of a
group. A partition moves only once its owner released it (at its next fetch, so after it committed what
it handled; or when it stopped fetching for MAX_POLL_INTERVAL) or died, and the new owner starts at the
committed offset: a rebalance skips nothing, and a stage that commits before fetching again sees no
record twice. A consumer with `on_revoked` awaits it, in that fetch, before it releases the partitions it
is losing: until the callback returned the new owner waits for them (it holds none of them meanwhile).
Consumer commits never move a committed offset backwards; `set_committed` (ops) does.

Errors:
    LogError
    └── EmbeddedLogError   `retriable` when SQLite was busy or the disk full; not retriable for an
                           unknown topic, a record too large, a keyless record on a compacted topic,
                           moving the offsets of a live group, a database from a newer popbridge
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import sqlite3
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Concatenate, Literal, ParamSpec, TypeVar

from schemas.topics import MAX_MESSAGE_BYTES, TopicSpec
from services.runtime.log import LogError, OnRevoked, Outgoing, Record, TopicPartition, Written

DB_NAME = "log.sqlite3"
# The database holds raw mail: the directory is the owner's only, the files too. SQLite gives the -wal
# and -shm files the database's mode.
DATA_DIR_MODE = 0o700
DB_FILE_MODE = 0o600
_DB_FILES = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm")
SCHEMA_VERSION = 1
MEMBER_TIMEOUT = 10.0  # seconds without a heartbeat after which a consumer is dead
MAX_POLL_INTERVAL = 300.0  # a live consumer that stopped fetching this long gives its partitions up (Kafka's)
POLL_INTERVAL = 0.2  # how soon a waiting fetch sees records another process wrote
FETCH_MAX_BYTES = MAX_MESSAGE_BYTES  # one fetch stops after this many value bytes (at least one record)
_BUSY_TIMEOUT = 30.0  # seconds a writer waits for another connection's write transaction

Clock = Callable[[], float]
Synchronous = Literal["FULL", "NORMAL"]
P = ParamSpec("P")
T = TypeVar("T")

_logger = logging.getLogger(__name__)

_SCHEMA = (
    "CREATE TABLE topics (name TEXT PRIMARY KEY, partitions INTEGER NOT NULL, config TEXT NOT NULL)",
    # log_end is the next offset to assign; it survives the deletion of the records before it.
    """CREATE TABLE partitions (
        topic TEXT NOT NULL, part INTEGER NOT NULL, log_start INTEGER NOT NULL DEFAULT 0,
        log_end INTEGER NOT NULL DEFAULT 0, last_ms INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (topic, part)) WITHOUT ROWID""",
    # value comes last so that reading the other columns never touches its overflow pages.
    """CREATE TABLE records (
        id INTEGER PRIMARY KEY, topic TEXT NOT NULL, part INTEGER NOT NULL, record_offset INTEGER NOT NULL,
        timestamp_ms INTEGER NOT NULL, key BLOB, value BLOB NOT NULL, UNIQUE (topic, part, record_offset))""",
    "CREATE INDEX records_by_time ON records (topic, part, timestamp_ms)",
    """CREATE TABLE committed (
        group_id TEXT NOT NULL, topic TEXT NOT NULL, part INTEGER NOT NULL, next_offset INTEGER NOT NULL,
        PRIMARY KEY (group_id, topic, part)) WITHOUT ROWID""",
    # version changes whenever membership or ownership changes: members re-sync when they see it move.
    "CREATE TABLE groups (group_id TEXT PRIMARY KEY, version INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID",
    """CREATE TABLE members (
        group_id TEXT NOT NULL, member_id TEXT NOT NULL, client TEXT NOT NULL, topics TEXT NOT NULL,
        heartbeat_ms INTEGER NOT NULL, PRIMARY KEY (group_id, member_id)) WITHOUT ROWID""",
    """CREATE TABLE owners (
        group_id TEXT NOT NULL, topic TEXT NOT NULL, part INTEGER NOT NULL, member_id TEXT NOT NULL,
        PRIMARY KEY (group_id, topic, part)) WITHOUT ROWID""",
)


class EmbeddedLogError(LogError):
    """The embedded log could not do what was asked; `retriable` says whether trying later can help."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


@dataclass(frozen=True)
class Member:
    """A live consumer of a group, as `popbridge groups` shows it."""

    member_id: str
    client: str  # host:pid of the process
    topics: tuple[str, ...]
    heartbeat_ms: int
    partitions: tuple[TopicPartition, ...]


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition of a keyed record: stable across processes and releases (never Python's hash())."""
    return zlib.crc32(key) % partitions


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


# --- SQLite plumbing -----------------------------------------------------------------------------


def _create_private(path: Path) -> None:
    """The data directory (0700) and the database file (0600), when they do not exist yet."""
    path.parent.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, DB_FILE_MODE))


def readable_by_others(data_dir: Path) -> list[tuple[Path, int]]:
    """The data directory and database files that users other than the owner may access, with their modes."""
    found = []
    for path in (data_dir, *(data_dir / name for name in _DB_FILES)):
        with contextlib.suppress(FileNotFoundError):
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                found.append((path, mode))
    return found


_WARNED: set[Path] = set()


def warn_if_readable_by_others(data_dir: Path) -> None:
    """One warning per path and process for each file holding mail that is not private to its owner."""
    for path, mode in readable_by_others(data_dir):
        if path not in _WARNED:
            _WARNED.add(path)
            wanted = DATA_DIR_MODE if path == data_dir else DB_FILE_MODE
            _logger.warning("%s is mode %04o: other local users may read the mail it holds; "
                           "chmod %04o %s", path, mode, wanted, path)


def _connect(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    _create_private(path)
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on a new, empty database
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL" if synchronous == "FULL" else "PRAGMA synchronous = NORMAL")
        # Truncate the WAL back to this size after a checkpoint, or one 50 MB mail leaves a 50 MB WAL behind.
        conn.execute(f"PRAGMA journal_size_limit = {2 * MAX_MESSAGE_BYTES}")
        _ensure_schema(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _user_version(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return version


def _ensure_schema(conn: sqlite3.Connection) -> None:
    if _user_version(conn) == SCHEMA_VERSION:
        return
    with _transaction(conn):
        version = _user_version(conn)
        if version > SCHEMA_VERSION:
            raise EmbeddedLogError(
                f"the embedded log was written by a newer popbridge (schema {version})", retriable=False
            )
        if version == 0:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[None]:
    """One transaction; IMMEDIATE takes the write lock up front so it never fails half way on a busy lock."""
    conn.execute(f"BEGIN {mode}")
    try:
        yield
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _wrap(exc: sqlite3.Error, path: Path) -> EmbeddedLogError:
    # Busy, locked, disk full, I/O error: OperationalError, worth retrying. Corruption or a bug: not.
    retriable = isinstance(exc, sqlite3.OperationalError)
    name = getattr(exc, "sqlite_errorname", type(exc).__name__)
    return EmbeddedLogError(f"embedded log {path}: {name}: {exc}", retriable=retriable)


class _Worker:
    """One thread holding one SQLite connection; the log's blocking work runs there, in call order."""

    def __init__(self, path: Path, synchronous: Synchronous) -> None:
        self._path = path
        self._synchronous: Synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="popbridge-log")
        self._conn: sqlite3.Connection | None = None

    async def run(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: self._call(fn, *args, **kwargs))

    def _call(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        try:
            if self._conn is None:
                self._conn = _connect(self._path, self._synchronous)
            return fn(self._conn, *args, **kwargs)
        except sqlite3.Error as exc:
            raise _wrap(exc, self._path) from exc

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_connection)
        finally:
            self._executor.shutdown(wait=True)


class _Changes:
    """Wakes the waiting fetches of this process when a producer appended or a group changed."""

    def __init__(self) -> None:
        self.count = 0
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        self.count += 1
        for waiter in self._waiters:
            waiter.get_loop().call_soon_threadsafe(_resolve, waiter)

    async def wait(self, since: int, seconds: float) -> None:
        """Wait up to `seconds` unless something changed after `count` was `since`."""
        if self.count != since:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait([waiter], timeout=seconds)
        finally:
            self._waiters.discard(waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


_CHANGES: dict[Path, _Changes] = {}  # one per database file, shared by every EmbeddedLog on it


# --- reading and writing records -------------------------------------------------------------------


@dataclass(frozen=True)
class _Topic:
    name: str
    partitions: int
    config: dict[str, str]

    @property
    def compacted(self) -> bool:
        return "compact" in self.config.get("cleanup.policy", "delete").split(",")

    def check(self, record: Outgoing) -> None:
        size = len(record.value) + len(record.key or b"")
        limit = int(self.config.get("max.message.bytes", MAX_MESSAGE_BYTES))
        if size > limit:
            raise EmbeddedLogError(
                f"record of {size} bytes exceeds max.message.bytes={limit} of topic {self.name!r}",
                retriable=False,
            )
        if record.key is None and self.compacted:
            raise EmbeddedLogError(f"topic {self.name!r} is compacted: a record needs a key", retriable=False)


def _topic(conn: sqlite3.Connection, name: str) -> _Topic:
    row = conn.execute("SELECT partitions, config FROM topics WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise EmbeddedLogError(
            f"unknown topic {name!r}: create it first (popbridge topics create)", retriable=False
        )
    return _Topic(name, row[0], json.loads(row[1]))


def _bounds(conn: sqlite3.Connection, tp: TopicPartition) -> tuple[int, int]:
    row = conn.execute(
        "SELECT log_start, log_end FROM partitions WHERE topic = ? AND part = ?", (tp.topic, tp.partition)
    ).fetchone()
    if row is None:
        raise EmbeddedLogError(f"unknown partition {tp.topic}/{tp.partition}", retriable=False)
    return row[0], row[1]


def _insert(conn: sqlite3.Connection, record: Outgoing, part: int, now_ms: int) -> Written:
    log_end, last_ms = conn.execute(
        "SELECT log_end, last_ms FROM partitions WHERE topic = ? AND part = ?", (record.topic, part)
    ).fetchone()
    timestamp = max(now_ms, last_ms)  # never decreasing, so offsets_for_time is well defined
    conn.execute(
        "INSERT INTO records (topic, part, record_offset, timestamp_ms, key, value)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (record.topic, part, log_end, timestamp, record.key, record.value),
    )
    conn.execute(
        "UPDATE partitions SET log_end = ?, last_ms = ? WHERE topic = ? AND part = ?",
        (log_end + 1, timestamp, record.topic, part),
    )
    return Written(record.topic, part, log_end)


def _append(
    conn: sqlite3.Connection, batch: Sequence[Sequence[Outgoing]], now_ms: int, round_robin: dict[str, int]
) -> list[list[Written] | LogError]:
    """Write every valid request of `batch` in one transaction; an invalid request gets its error."""
    outcomes: list[list[Written] | LogError] = []
    with _transaction(conn):
        topics: dict[str, _Topic] = {}
        for records in batch:
            try:
                placed = [(r, _place(conn, r, topics, round_robin)) for r in records]
            except EmbeddedLogError as exc:
                outcomes.append(exc)
                continue
            outcomes.append([_insert(conn, r, part, now_ms) for r, part in placed])
    return outcomes


def _place(
    conn: sqlite3.Connection, record: Outgoing, topics: dict[str, _Topic], round_robin: dict[str, int]
) -> int:
    topic = topics.get(record.topic) or topics.setdefault(record.topic, _topic(conn, record.topic))
    topic.check(record)
    if record.key is not None:
        return partition_for_key(record.key, topic.partitions)
    turn = round_robin.get(record.topic, 0)
    round_robin[record.topic] = turn + 1
    return turn % topic.partitions


def _read(
    conn: sqlite3.Connection, tp: TopicPartition, start: int, limit: int, max_bytes: int
) -> list[Record]:
    """Records of `tp` from offset `start`: at most `limit`, stopping once `max_bytes` of values are read."""
    records: list[Record] = []
    size = 0
    query = (
        "SELECT record_offset, key, value, timestamp_ms FROM records"
        " WHERE topic = ? AND part = ? AND record_offset >= ? ORDER BY record_offset LIMIT ?"
    )
    with contextlib.closing(conn.execute(query, (tp.topic, tp.partition, start, limit))) as rows:
        for offset, key, value, timestamp in rows:
            records.append(Record(tp.topic, tp.partition, offset, key, value, timestamp))
            size += len(value)
            if size >= max_bytes:
                break
    return records


# --- producer --------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    records: Sequence[Outgoing]
    done: asyncio.Future[list[Written]]


class EmbeddedProducer:
    """LogProducer on the embedded log. Sends made while a commit is in progress share the next one."""

    def __init__(self, worker: _Worker, changes: _Changes, clock: Clock) -> None:
        self._worker = worker
        self._changes = changes
        self._clock = clock
        self._round_robin: dict[str, int] = {}
        self._pending: list[_Request] = []
        self._flushing: asyncio.Task[None] | None = None

    async def send(self, record: Outgoing) -> Written:
        return (await self.send_all([record]))[0]

    async def send_all(self, records: Sequence[Outgoing]) -> list[Written]:
        if not records:
            return []
        request = _Request(list(records), asyncio.get_running_loop().create_future())
        self._pending.append(request)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        return await request.done

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            outcomes: Sequence[list[Written] | BaseException]
            try:
                now_ms = int(self._clock() * 1000)
                outcomes = await self._worker.run(
                    _append, [r.records for r in batch], now_ms, self._round_robin
                )
            except Exception as exc:  # every request of the batch learns why; the flush itself goes on
                outcomes = [exc] * len(batch)
            for request, outcome in zip(batch, outcomes, strict=True):
                if request.done.done():
                    continue  # the sender was cancelled: its records may or may not be written
                if isinstance(outcome, BaseException):
                    request.done.set_exception(outcome)
                else:
                    request.done.set_result(outcome)
            self._changes.notify()

    async def drain(self) -> None:
        """Wait until every send made so far is settled."""
        while self._flushing is not None and not self._flushing.done():
            await asyncio.wait([self._flushing])


# --- consumer --------------------------------------------------------------------------------------


@dataclass(eq=False)
class _GroupMember:
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

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def sync(self, conn: sqlite3.Connection, *, release: bool = True, force: bool = False) -> None:
        """Heartbeat, drop dead members, and release/claim partitions to match the assignment.

        `release=False` (a heartbeat while records are being handled) keeps partitions that moved to
        another member until the next fetch, so they move only after their records were committed.
        With an on_revoked callback only the partitions `handed_over` are released, unless `force`
        (a stalled member)."""
        with _transaction(conn):
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
            if _process_gone(client):
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

    def _start(self, conn: sqlite3.Connection, tp: TopicPartition) -> int:
        """Where a newly owned partition is read from: the committed offset, else the earliest record."""
        log_start, log_end = _bounds(conn, tp)
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
        owned = sorted(self.positions)
        if not owned:
            return []
        self.turn += 1  # start at a different partition each time, so none starves
        order = owned[self.turn % len(owned) :] + owned[: self.turn % len(owned)]
        records: list[Record] = []
        size = 0
        for tp in order:
            if len(records) >= max_records or size >= FETCH_MAX_BYTES:
                break
            batch = _read(conn, tp, self.positions[tp], max_records - len(records), FETCH_MAX_BYTES - size)
            if batch:
                self.positions[tp] = batch[-1].offset + 1
                records += batch
                size += sum(len(r.value) for r in batch)
        return records

    def caught_up(self, conn: sqlite3.Connection) -> bool:
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
        )

    def commit(self, conn: sqlite3.Connection, offsets: Mapping[TopicPartition, int]) -> None:
        with _transaction(conn):
            conn.executemany(
                "INSERT INTO committed VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE"
                " SET next_offset = max(next_offset, excluded.next_offset)",
                [(self.group, tp.topic, tp.partition, offset) for tp, offset in offsets.items()],
            )

    def leave(self, conn: sqlite3.Connection) -> None:
        with _transaction(conn):
            key = (self.group, self.member_id)
            conn.execute("DELETE FROM members WHERE group_id = ? AND member_id = ?", key)
            conn.execute("DELETE FROM owners WHERE group_id = ? AND member_id = ?", key)
            conn.execute("UPDATE groups SET version = version + 1 WHERE group_id = ?", (self.group,))


def _client() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_gone(client: str) -> bool:
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
        worker: _Worker,
        changes: _Changes,
        member: _GroupMember,
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

    async def caught_up(self) -> bool:
        return await self._run(self._member.caught_up)

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


# --- the log ---------------------------------------------------------------------------------------


class EmbeddedLog:
    """The log in one SQLite database under `data_dir`, shared by the stages and commands of one machine.

    `clock` (seconds, like time.time) stamps records and heartbeats; tests inject one.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        synchronous: Synchronous = "FULL",
        clock: Clock = time.time,
        member_timeout: float = MEMBER_TIMEOUT,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_NAME
        self._synchronous: Synchronous = synchronous
        self._clock = clock
        self._member_timeout = member_timeout
        self._poll_interval = poll_interval
        self._changes = _CHANGES.setdefault(self.path.absolute(), _Changes())
        warn_if_readable_by_others(self.data_dir)

    def __repr__(self) -> str:
        return f"EmbeddedLog({str(self.data_dir)!r})"

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    @asynccontextmanager
    async def _worker(self) -> AsyncIterator[_Worker]:
        worker = _Worker(self.path, self._synchronous)
        try:
            yield worker
        finally:
            await worker.close()

    async def _admin(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        async with self._worker() as worker:
            return await worker.run(fn, *args, **kwargs)

    # The Log interface.

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> list[str]:
        created = await self._admin(_create_topics, specs)
        self._changes.notify()
        return created

    @asynccontextmanager
    async def producer(self) -> AsyncIterator[EmbeddedProducer]:
        async with self._worker() as worker:
            producer = EmbeddedProducer(worker, self._changes, self._clock)
            try:
                yield producer
            finally:
                await producer.drain()

    @asynccontextmanager
    async def consumer(
        self, group: str, topics: Sequence[str], *, on_revoked: OnRevoked | None = None
    ) -> AsyncIterator[EmbeddedConsumer]:
        """A group member; `on_revoked` is awaited in its fetch before it releases partitions it is losing."""
        member = _GroupMember(group, tuple(topics), self._clock, int(self._member_timeout * 1000))
        async with self._worker() as worker:
            consumer = EmbeddedConsumer(worker, self._changes, member, self._poll_interval, on_revoked)
            await consumer.join()
            heartbeat = asyncio.create_task(
                consumer.heartbeat_forever(self._member_timeout / 5, MAX_POLL_INTERVAL)
            )
            try:
                yield consumer
            finally:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
                await self._leave(worker, member)

    async def _leave(self, worker: _Worker, member: _GroupMember) -> None:
        try:
            await worker.run(member.leave)
        except LogError as exc:  # the others take it for dead after member_timeout instead
            _logger.warning("embedded log: consumer could not leave group %s: %s", member.group, exc)
        self._changes.notify()

    # Admin operations for the ops commands.

    async def partitions(self, topic: str) -> list[int]:
        """The partition numbers of `topic` (empty when it does not exist)."""
        return sorted(await self._admin(_partition_bounds, topic))

    async def start_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset of the earliest record still kept."""
        return {p: start for p, (start, _) in (await self._admin(_partition_bounds, topic)).items()}

    async def end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset the next record will get."""
        return {p: end for p, (_, end) in (await self._admin(_partition_bounds, topic)).items()}

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        """Per partition that has one, the committed offset (next to read) of `group`."""
        return await self._admin(_committed, group, topic)

    async def offsets_for_time(self, topic: str, timestamp_ms: int) -> dict[int, int]:
        """Per partition, the first offset with a timestamp >= `timestamp_ms`, else the end offset."""
        return await self._admin(_offsets_for_time, topic, timestamp_ms)

    async def set_committed(
        self, group: str, offsets: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        """Move the committed offsets of a stopped group, clamped to the records kept; returns what was set.

        Refused (EmbeddedLogError) while the group has a live consumer, which would overwrite them."""
        return await self._admin(
            _set_committed, group, offsets, self._now_ms() - int(self._member_timeout * 1000)
        )

    async def read(self, topic: str, partition: int, start: int, end: int) -> list[Record]:
        """The records of one partition with `start <= offset < end` (for trace and dead-letter commands)."""
        tp = TopicPartition(topic, partition)
        return await self._admin(_read, tp, start, max(0, end - start), 2**62)

    async def scan(self, topic: str) -> AsyncIterator[Record]:
        """Every record of `topic`, partition by partition, up to the end at the time of the call."""
        async with self._worker() as worker:
            for part, (start, end) in (await worker.run(_partition_bounds, topic)).items():
                position = start
                while position < end:
                    tp = TopicPartition(topic, part)
                    batch = await worker.run(_read, tp, position, min(500, end - position), FETCH_MAX_BYTES)
                    for record in batch:
                        if record.offset < end:  # compaction leaves gaps: the batch may pass the end
                            yield record
                    position = batch[-1].offset + 1 if batch else end

    async def groups(self) -> list[str]:
        """Every group with committed offsets or consumers."""
        return await self._admin(_groups)

    async def active_members(self, group: str) -> list[Member]:
        """The live consumers of `group` and the partitions each owns."""
        return await self._admin(_active_members, group, self._now_ms() - int(self._member_timeout * 1000))

    async def compact(self, topic: str) -> int:
        """Keep only the latest record of each key (keyless records stay); returns how many were deleted."""
        return await self._admin(_compact, topic)

    async def expire(self, topic: str) -> int:
        """Delete the records older than the topic's `retention.ms`; returns how many were deleted."""
        return await self._admin(_expire, topic, self._now_ms())

    async def clean_up(self) -> dict[str, int]:
        """Compaction and retention as each topic's `cleanup.policy` says; records deleted per topic."""
        deleted: dict[str, int] = {}
        for name, policy in await self._admin(_cleanup_policies):
            count = await self.compact(name) if "compact" in policy else 0
            deleted[name] = count + (await self.expire(name) if "delete" in policy else 0)
        return deleted


# --- admin operations, run on a worker thread ------------------------------------------------------


def _create_topics(conn: sqlite3.Connection, specs: Sequence[TopicSpec]) -> list[str]:
    created: list[str] = []
    with _transaction(conn):
        for spec in specs:
            if conn.execute("SELECT 1 FROM topics WHERE name = ?", (spec.name,)).fetchone():
                continue
            conn.execute(
                "INSERT INTO topics VALUES (?, ?, ?)", (spec.name, spec.partitions, json.dumps(spec.config))
            )
            conn.executemany(
                "INSERT INTO partitions (topic, part) VALUES (?, ?)",
                [(spec.name, p) for p in range(spec.partitions)],
            )
            created.append(spec.name)
        if created:  # consumers subscribed to a new topic get its partitions at their next fetch
            conn.execute("UPDATE groups SET version = version + 1")
    return created


def _partition_bounds(conn: sqlite3.Connection, topic: str) -> dict[int, tuple[int, int]]:
    """Per partition, (log start, log end); empty for an unknown topic, as on Kafka."""
    rows = conn.execute(
        "SELECT part, log_start, log_end FROM partitions WHERE topic = ? ORDER BY part", (topic,)
    )
    return {p: (start, end) for p, start, end in rows}


def _committed(conn: sqlite3.Connection, group: str, topic: str) -> dict[int, int]:
    rows = conn.execute(
        "SELECT part, next_offset FROM committed WHERE group_id = ? AND topic = ? ORDER BY part",
        (group, topic),
    )
    return dict(rows.fetchall())


def _offsets_for_time(conn: sqlite3.Connection, topic: str, timestamp_ms: int) -> dict[int, int]:
    result: dict[int, int] = {}
    for part, (_, end) in _partition_bounds(conn, topic).items():
        row = conn.execute(
            "SELECT min(record_offset) FROM records WHERE topic = ? AND part = ? AND timestamp_ms >= ?",
            (topic, part, timestamp_ms),
        ).fetchone()
        result[part] = end if row[0] is None else row[0]
    return result


def _live_clients(conn: sqlite3.Connection, group: str, alive_since_ms: int) -> list[str]:
    rows = conn.execute(
        "SELECT client FROM members WHERE group_id = ? AND heartbeat_ms >= ? ORDER BY client",
        (group, alive_since_ms),
    )
    return [client for (client,) in rows]


def _set_committed(
    conn: sqlite3.Connection, group: str, offsets: Mapping[TopicPartition, int], alive_since_ms: int
) -> dict[TopicPartition, int]:
    result: dict[TopicPartition, int] = {}
    with _transaction(conn):
        clients = _live_clients(conn, group, alive_since_ms)
        if clients:
            raise EmbeddedLogError(
                f"group {group!r} has {len(clients)} live consumer(s) ({', '.join(clients)}):"
                " stop them before moving its offsets",
                retriable=False,
            )
        for tp, offset in sorted(offsets.items()):
            log_start, log_end = _bounds(conn, tp)
            result[tp] = min(max(offset, log_start), log_end)
            conn.execute(
                "INSERT INTO committed VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO UPDATE SET next_offset = excluded.next_offset",
                (group, tp.topic, tp.partition, result[tp]),
            )
    return result


def _groups(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute("SELECT group_id FROM committed UNION SELECT group_id FROM members ORDER BY 1")
    return [group for (group,) in rows]


def _active_members(conn: sqlite3.Connection, group: str, alive_since_ms: int) -> list[Member]:
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


def _compact(conn: sqlite3.Connection, topic: str) -> int:
    _topic(conn, topic)
    with _transaction(conn):
        deleted = conn.execute(
            "DELETE FROM records WHERE topic = ?1 AND key IS NOT NULL AND (part, key, record_offset) NOT IN"
            " (SELECT part, key, max(record_offset) FROM records WHERE topic = ?1 AND key IS NOT NULL"
            " GROUP BY part, key)",
            (topic,),
        ).rowcount
    conn.execute("PRAGMA incremental_vacuum")
    return deleted


def _expire(conn: sqlite3.Connection, topic: str, now_ms: int) -> int:
    retention = int(_topic(conn, topic).config.get("retention.ms", "-1"))
    if retention < 0:
        return 0
    with _transaction(conn):
        deleted = conn.execute(
            "DELETE FROM records WHERE topic = ? AND timestamp_ms < ?", (topic, now_ms - retention)
        ).rowcount
        conn.execute(
            "UPDATE partitions SET log_start = coalesce((SELECT min(record_offset) FROM records AS r"
            " WHERE r.topic = partitions.topic AND r.part = partitions.part), log_end) WHERE topic = ?",
            (topic,),
        )
    conn.execute("PRAGMA incremental_vacuum")
    return deleted


def _cleanup_policies(conn: sqlite3.Connection) -> list[tuple[str, list[str]]]:
    rows = conn.execute("SELECT name, config FROM topics ORDER BY name").fetchall()
    return [(name, json.loads(config).get("cleanup.policy", "delete").split(",")) for name, config in rows]
