"""The one way an operator command reads a topic: no consumer group, bounded by partition, offsets and time.

- `keyed` reads the one partition a key lives on (services.ops.locate plans it), within a time window
  turned into offsets by the log's time index, and yields only that key's records: `popbridge trace`
  and `dlq show`/`retry` of a full fetch id read this way.
- `windowed` reads every partition of a topic within a time window: `dlq list` (bounded by `--since`)
  and a trace by Message-ID that the router's by-message-id topic cannot answer.
- `events` reads a whole topic (its beginning up to its end at the time of the call, `OpsLog.scan`): the
  shadow replay's input, and the old trace path the scale benchmark measures against.
- `read_chunks` and `read_range` read one partition between two offsets, `chunk` offsets per read.

None joins a consumer group, so an operator's read commits nothing and needs no group permission. A
record that does not decode is skipped: a foreign record is not part of any message's story.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import TypeVar

from schemas import codec
from schemas.events import Event
from services.ops.locate import CHUNK, KeyRead, Window, next_chunk
from services.runtime.gathering import gather_or_raise
from services.runtime.log import LogError, LogRefusedError, Record
from services.runtime.ops_log import OpsLog, RangeReader

E = TypeVar("E", bound=Event)


def decoded(records: Iterable[Record], wanted: tuple[type[E], ...]) -> list[tuple[Record, E]]:
    """The records that hold one of the `wanted` events, with that event."""
    found: list[tuple[Record, E]] = []
    for record in records:
        try:
            event = codec.decode_any(record.value)
        except codec.EventDecodeError:
            continue
        if isinstance(event, wanted):
            found.append((record, event))
    return found


async def events(log: OpsLog, topic: str, wanted: tuple[type[E], ...]) -> AsyncIterator[tuple[Record, E]]:
    """Every record of `topic` holding one of the `wanted` events, with that event, in log order."""
    async for record in log.scan(topic):
        for pair in decoded((record,), wanted):
            yield pair


async def partition_counts(log: RangeReader, topics: Iterable[str]) -> dict[str, int]:
    """Per topic, its partition count; 0 for a topic not created (yet). The topics are asked at once (a
    Kafka lookup costs a client start)."""
    names = list(topics)
    return dict(zip(names, await gather_or_raise(*(_count(log, t) for t in names)), strict=True))


async def _count(log: RangeReader, topic: str) -> int:
    try:
        return len(await log.end_offsets(topic))
    except LogError as exc:
        if exc.retriable or isinstance(exc, LogRefusedError):
            raise
        return 0  # the embedded log's "unknown topic"


async def offset_bounds(log: RangeReader, topic: str, window: Window) -> dict[int, tuple[int, int]]:
    """Per partition, the offsets [start, end) of the records appended within `window`; the end is fixed
    now (what is written later is outside the read)."""
    # asked at once (on Kafka each lookup starts a client); a failure waits for the others to end
    since = window.since_ms
    first = log.start_offsets(topic) if since is None else log.offsets_for_time(topic, since)
    lookups = [log.end_offsets(topic), first]
    if window.until_ms is not None:
        lookups.append(log.offsets_for_time(topic, window.until_ms))
    ends, starts, *until = await gather_or_raise(*lookups)
    stops = until[0] if until else ends
    return {p: (starts.get(p, end), min(stops.get(p, end), end)) for p, end in ends.items()}


async def keyed(
    log: RangeReader, read: KeyRead, *, newest_first: bool = False, chunk: int = CHUNK
) -> AsyncIterator[Record]:
    """The records keyed `read.key` on `read.partition` within `read.window`, in log order (or newest first).
    The log compares keys before it builds a record, so nothing else is built or decoded, and the reads
    grow to MAX_CHUNK offsets at once (they hold only the key's records)."""
    start, end = (await offset_bounds(log, read.topic, read.window)).get(read.partition, (0, 0))
    end = end if read.stop is None else min(end, read.stop)
    async for records in growing_reads(log, read.topic, read.partition, start, end,
                                       newest_first=newest_first, chunk=chunk, key=read.key):
        for record in reversed(records) if newest_first else records:
            yield record


async def windowed(
    log: RangeReader, topic: str, window: Window, *, chunk: int = CHUNK
) -> AsyncIterator[Record]:
    """Every record of `topic` appended within `window`, partition by partition, in log order."""
    for partition, (start, end) in sorted((await offset_bounds(log, topic, window)).items()):
        reads = growing_reads(log, topic, partition, start, end, newest_first=False, chunk=chunk)
        async for records in reads:
            for record in records:
                yield record


async def growing_reads(
    log: RangeReader, topic: str, partition: int, start: int, end: int, *, newest_first: bool, chunk: int,
    key: bytes | None = None,
) -> AsyncIterator[list[Record]]:
    """The records of one partition in [start, end) (only those keyed `key` when given), oldest or newest
    range first, in reads that grow while their records are small and shrink when large (services.ops
    .locate.next_chunk: bytes per read bounded)."""
    while start < end:
        a, b = (max(start, end - chunk), end) if newest_first else (start, min(end, start + chunk))
        records = await log.read(topic, partition, a, b, key=key)
        yield records
        chunk = next_chunk(chunk, sum(len(r.value) + len(r.key or b"") for r in records))
        start, end = (start, a) if newest_first else (b, end)


async def read_chunks(
    log: RangeReader, topic: str, partition: int, start: int, end: int, *, chunk: int = 100
) -> AsyncIterator[list[Record]]:
    """The records of one partition from `start` up to `end`, `chunk` offsets per read (a bounded batch)."""
    while start < end:
        upto = min(end, start + chunk)
        yield await log.read(topic, partition, start, upto)
        start = upto


async def read_range(
    log: RangeReader, topic: str, partition: int, start: int, end: int, *, chunk: int = 100
) -> AsyncIterator[Record]:
    """The records of one partition from `start` up to `end`, one by one (read as `read_chunks`)."""
    async for records in read_chunks(log, topic, partition, start, end, chunk=chunk):
        for record in records:
            yield record
