"""services/ops/replay.py: reading the time, planning the offset reset and the window copy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.ops.replay import parse_time, plan_text, reset_plan, to_ms, window_plan, window_text
from services.runtime.log import TopicPartition

SINCE = datetime(2026, 11, 27, 8, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-27T08:00", SINCE),
        ("2026-11-27T08:00:00Z", SINCE),
        ("2026-11-27T09:00+01:00", SINCE),
        ("2026-11-27 08:00:00.000", SINCE),
        ("2026-11-27", datetime(2026, 11, 27, tzinfo=UTC)),
    ],
)
def test_times_are_iso_8601_and_utc_unless_they_name_a_zone(text: str, expected: datetime) -> None:
    assert parse_time(text) == expected


def test_a_zone_given_is_kept() -> None:
    assert parse_time("2026-11-27T09:00+01:00").utcoffset() == timezone(timedelta(hours=1)).utcoffset(None)


def test_a_time_that_is_not_iso_8601_is_refused_with_examples() -> None:
    with pytest.raises(ValueError, match=r"not an ISO 8601 time: 'yesterday' \(e\.g\. 2026-11-27T08:00"):
        parse_time("yesterday")


def test_the_plan_moves_each_partition_to_the_offset_found_for_the_time() -> None:
    plan = reset_plan(
        stage="router", group="popbridge-router", topic="fetched", since=SINCE,
        committed={0: 10, 1: 3}, targets={0: 4, 1: 3, 2: 0}, ends={0: 10, 1: 5, 2: 0},
    )
    rows = [(p.partition, p.current, p.new, p.reread) for p in plan.partitions]
    assert rows == [(0, 10, 4, 6), (1, 3, 3, 2), (2, None, 0, 0)]
    assert plan.offsets() == {TopicPartition("fetched", 0): 4, TopicPartition("fetched", 1): 3,
                              TopicPartition("fetched", 2): 0}
    assert plan.changes


def test_the_dry_run_text_shows_committed_to_new() -> None:
    plan = reset_plan(
        stage="router", group="g", topic="fetched", since=SINCE,
        committed={0: 10}, targets={0: 4}, ends={0: 10},
    )
    text = "\n".join(plan_text(plan))
    assert "replay router (group g) from 2026-11-27T08:00:00+00:00" in text
    assert "10 -> 4" in text
    assert "6 record(s) to read again" in text


UNTIL = SINCE + timedelta(hours=1)


def test_a_window_is_the_offsets_from_the_time_of_from_to_the_time_of_to() -> None:
    plan = window_plan(
        stage="router", topic="fetched", since=SINCE, until=UNTIL,
        starts={0: 4, 1: 3, 2: 0}, stops={0: 7, 1: 3, 2: 0}, ends={0: 10, 1: 5, 2: 0},
    )
    rows = [(p.partition, p.start, p.end, p.records) for p in plan.partitions]
    assert rows == [(0, 4, 7, 3), (1, 3, 3, 0), (2, 0, 0, 0)]
    assert plan.records == 3


def test_a_window_ends_at_the_end_offsets_of_planning_so_copies_are_never_in_it() -> None:
    # Offsets looked up after the end offsets may already count records written since (the copies of
    # a concurrent run, with a timestamp inside a window that reaches into the future): they are cut off.
    plan = window_plan(
        stage="deliverer", topic="routed", since=SINCE, until=UNTIL,
        starts={0: 12, 1: 2}, stops={0: 15, 1: 9}, ends={0: 10, 1: 6, 2: 4},
    )
    rows = [(p.partition, p.start, p.end) for p in plan.partitions]
    assert rows == [(0, 10, 10), (1, 2, 6), (2, 4, 4)]  # a partition without an answer: empty window


def test_the_window_dry_run_shows_offsets_and_counts_per_partition() -> None:
    plan = window_plan(
        stage="router", topic="fetched", since=SINCE, until=UNTIL,
        starts={0: 4, 1: 5}, stops={0: 7, 1: 5}, ends={0: 10, 1: 5},
    )
    text = window_text(plan)
    assert text[0] == ("replay router from 2026-11-27T08:00:00+00:00 to 2026-11-27T09:00:00+00:00: "
                       "copy the window to the end of fetched")
    assert text[2].split() == ["fetched", "0", "4..7", "3"]
    assert text[3].split() == ["fetched", "1", "-", "0"]
    assert "3 record(s) to copy; the group and the running stage are not touched" in text[-1]


def test_milliseconds_are_exact() -> None:
    assert to_ms(parse_time("2026-11-27T08:00:00.123")) % 1000 == 123
    assert to_ms(datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)) == 1000
