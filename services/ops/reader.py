"""The one way an operator command reads a topic: no consumer group, bounded by partition and offsets.

`events` reads a whole topic (its beginning up to its end at the time of the call, through
`OpsLog.scan`) and yields the records that decode as one of the wanted events; `read_chunks` and
`read_range` read one partition between two offsets, `chunk` offsets per read. None joins a consumer
group, so an operator's read commits nothing and needs no group permission. A record that does not
decode is skipped: a foreign record is not part of any message's story.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

from schemas import codec
from schemas.events import Event
from services.runtime.log import Record
from services.runtime.ops_log import OpsLog

E = TypeVar("E", bound=Event)


async def events(log: OpsLog, topic: str, wanted: tuple[type[E], ...]) -> AsyncIterator[tuple[Record, E]]:
    """Every record of `topic` holding one of the `wanted` events, with that event, in log order."""
    async for record in log.scan(topic):
        try:
            event = codec.decode_any(record.value)
        except codec.EventDecodeError:
            continue
        if isinstance(event, wanted):
            yield record, event


async def read_chunks(
    log: OpsLog, topic: str, partition: int, start: int, end: int, *, chunk: int = 100
) -> AsyncIterator[list[Record]]:
    """The records of one partition from `start` up to `end`, `chunk` offsets per read (a bounded batch)."""
    while start < end:
        upto = min(end, start + chunk)
        yield await log.read(topic, partition, start, upto)
        start = upto


async def read_range(
    log: OpsLog, topic: str, partition: int, start: int, end: int, *, chunk: int = 100
) -> AsyncIterator[Record]:
    """The records of one partition from `start` up to `end`, one by one (read as `read_chunks`)."""
    async for records in read_chunks(log, topic, partition, start, end, chunk=chunk):
        for record in records:
            yield record
