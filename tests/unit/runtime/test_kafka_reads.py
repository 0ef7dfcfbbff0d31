"""services/runtime/kafka_reads.py: which kept-open consumer a ranged read takes (no I/O)."""

from __future__ import annotations

from services.runtime.kafka_reads import idle_reader


def test_a_read_takes_the_idle_consumer_that_last_read_its_topic() -> None:
    idle = [{"routed"}, {"fetched"}, {"attempts"}]
    assert idle_reader("fetched", idle) == 1  # not the latest freed: moving it costs a metadata round
    assert idle_reader("routed", idle) == 0


def test_without_one_on_its_topic_a_read_takes_the_latest_freed() -> None:
    assert idle_reader("dead-letters", [{"routed"}, set(), {"attempts"}]) == 2
    assert idle_reader("fetched", [{"fetched"}, {"fetched"}]) == 1
