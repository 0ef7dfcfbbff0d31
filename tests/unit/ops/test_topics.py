"""services/ops/topics.py: the plan of `topics create` and how it is printed."""

from __future__ import annotations

from schemas.topics import TopicSpec
from services.ops.topics import TopicStep, executed, plan_json, plan_topics, step_line

FETCHED = TopicSpec("fetched", 6, {"retention.ms": "604800000"})
ROUTED = TopicSpec("routed", 6, {})


def test_missing_topics_are_planned_for_creation_and_existing_ones_are_left_alone() -> None:
    assert plan_topics([FETCHED, ROUTED], {"routed": 3, "unrelated": 1}) == [
        TopicStep(FETCHED, "create"), TopicStep(ROUTED, "exists", 3)]


def test_what_was_created_is_told_apart_from_what_another_creator_made_meanwhile() -> None:
    plan = plan_topics([FETCHED, ROUTED], {})
    assert [s.action for s in executed(plan, ["fetched"])] == ["created", "exists"]


def test_a_line_per_topic_keeps_the_documented_format_and_flags_a_partition_count_that_differs() -> None:
    assert step_line(TopicStep(FETCHED, "created")) == "created  fetched partitions=6 retention.ms=604800000"
    assert step_line(TopicStep(ROUTED, "exists", 6)) == "exists   routed partitions=6 "
    assert step_line(TopicStep(ROUTED, "exists", 3)).endswith("(found with 3 partitions)")


def test_the_json_plan_says_whether_anything_was_done() -> None:
    assert plan_json([TopicStep(ROUTED, "exists", 3)], dry_run=True) == {
        "dry_run": True,
        "topics": [{"name": "routed", "action": "exists", "partitions": 6, "found_partitions": 3,
                    "config": {}}],
    }
