"""services/runtime/idle.py: when a stage counts as caught up."""

from __future__ import annotations

from services.runtime.idle import is_idle


def test_idle_when_every_partition_is_committed_to_its_end() -> None:
    assert is_idle({0: 5, 1: 3}, {0: 5, 1: 3})


def test_not_idle_while_a_partition_lags() -> None:
    assert not is_idle({0: 5, 1: 3}, {0: 5, 1: 2})


def test_empty_partitions_need_no_commit() -> None:
    assert is_idle({0: 0, 1: 2}, {1: 2})
    assert not is_idle({0: 1}, {})
