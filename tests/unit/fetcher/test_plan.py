"""services/fetcher/plan.py: which messages a pass retrieves, deletes only, or leaves."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.events import FetchRecorded
from services.fetcher.plan import Listed, plan_pass

T = datetime(2026, 11, 27, tzinfo=UTC)
MB = 1024 * 1024


def recorded(uidl: str, size: int) -> FetchRecorded:
    return FetchRecorded(
        mailbox_id="mb", uidl=uidl, fetch_id="f-" + uidl, size=size, sha256="x", published_at=T
    )


def test_new_messages_are_retrieved() -> None:
    listing = [Listed(1, "a", 100), Listed(2, "b", 200)]
    plan = plan_pass(listing, {}, mode="delete", max_message_size=50 * MB)
    assert plan.retrieve == listing
    assert plan.delete_only == []


def test_published_but_not_deleted_is_deleted_without_publishing_again() -> None:
    listing = [Listed(1, "a", 100), Listed(2, "b", 200)]
    plan = plan_pass(listing, {"a": recorded("a", 100)}, mode="delete", max_message_size=50 * MB)
    assert plan.delete_only == [Listed(1, "a", 100)]
    assert plan.retrieve == [Listed(2, "b", 200)]


def test_keep_mode_leaves_published_messages_alone() -> None:
    listing = [Listed(1, "a", 100)]
    plan = plan_pass(listing, {"a": recorded("a", 100)}, mode="keep", max_message_size=50 * MB)
    assert (plan.retrieve, plan.delete_only, plan.too_big) == ([], [], [])


def test_a_reused_uidl_with_another_size_is_new_mail() -> None:
    listing = [Listed(1, "a", 999)]
    plan = plan_pass(listing, {"a": recorded("a", 100)}, mode="keep", max_message_size=50 * MB)
    assert plan.retrieve == listing


def test_messages_over_the_size_limit_stay_on_the_server() -> None:
    listing = [Listed(1, "a", 50 * MB + 1), Listed(2, "b", 50 * MB)]
    plan = plan_pass(listing, {}, mode="delete", max_message_size=50 * MB)
    assert plan.too_big == [Listed(1, "a", 50 * MB + 1)]
    assert plan.retrieve == [Listed(2, "b", 50 * MB)]
