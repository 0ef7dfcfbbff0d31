"""Which part of the fetch-state changelog a catch-up reads: pure, so the checkpoint arithmetic is tested
directly (the store and the reads are in services.fetcher.fetch_state)."""

from __future__ import annotations

from collections.abc import Mapping

READ_CHUNK = 20_000  # records per changelog read: bounds what a catch-up holds at once (a few MB)


def tail_ranges(checkpoint: Mapping[int, int], ends: Mapping[int, int]) -> dict[int, tuple[int, int]] | None:
    """Per partition, the [start, end) of the changelog not read yet; None when a checkpoint is past its
    partition's end or names a partition the topic lacks (the topic was recreated): the mirror must be
    dropped and read again from 0. (A topic recreated with as many partitions and already written past
    the checkpoints cannot be told apart: delete the store file when recreating the topic.)"""
    if set(checkpoint) - set(ends) or any(checkpoint.get(p, 0) > end for p, end in ends.items()):
        return None
    return {p: (checkpoint.get(p, 0), end) for p, end in ends.items() if checkpoint.get(p, 0) < end}


def chunks(start: int, end: int, size: int = READ_CHUNK) -> list[tuple[int, int]]:
    return [(s, min(s + size, end)) for s in range(start, end, size)]
