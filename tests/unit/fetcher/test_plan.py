"""services/fetcher/plan.py: which messages a pass retrieves, deletes only, or leaves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.events import FetchRecorded, fetch_id_for
from services.fetcher.plan import Listed, Plan, content_key, fetch_id_of, identify, plan_pass, session_part
from services.fetcher.pop3_protocol import valid_unique_id

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


def test_keep_days_deletes_what_was_published_before_the_cutoff() -> None:
    listing = [Listed(1, "old", 100), Listed(2, "new", 100), Listed(3, "unseen", 100)]
    known = {
        "old": recorded("old", 100),
        "new": FetchRecorded(mailbox_id="mb", uidl="new", fetch_id="f", size=100, sha256="x",
                             published_at=T + timedelta(days=2)),
    }  # fmt: skip
    now = T + timedelta(days=3, seconds=1)
    plan = plan_pass(listing, known, mode="keep", max_message_size=MB, keep_days=3, now=now)
    assert plan.delete_only == [Listed(1, "old", 100)]
    assert plan.retrieve == [Listed(3, "unseen", 100)]


def test_a_reused_uidl_is_marked_so_it_gets_its_own_fetch_id() -> None:
    plan = plan_pass([Listed(1, "a", 999), Listed(2, "b", 5)], {"a": recorded("a", 100)}, mode="delete",
                     max_message_size=MB)  # fmt: skip
    assert plan.reused == frozenset({"a"})
    sha = "ab" * 32
    assert fetch_id_of("mb", "a", sha, reused=True) == fetch_id_for("mb", "a#" + sha[:12])
    assert fetch_id_of("mb", "b", sha, reused=False) == fetch_id_for("mb", "b")


def listed(count: int, start: int = 1) -> list[Listed]:
    return [Listed(n, f"u{n}", 10) for n in range(start, start + count)]


def test_a_session_deletes_at_most_quit_every_messages_then_the_pass_reconnects() -> None:
    plan = Plan(retrieve=listed(8, 100), delete_only=listed(3))
    part, more = session_part(plan, quit_every=5, max_retrieve=None, deletes_retrieved=True)
    assert (part.delete_only, part.retrieve, more) == (listed(3), listed(2, 100), True)
    part, more = session_part(
        Plan(retrieve=listed(4)), quit_every=5, max_retrieve=None, deletes_retrieved=True
    )
    assert (len(part.retrieve), more) == (4, False)


def test_keep_mode_retrieves_everything_in_one_session_and_max_retrieve_waits_for_the_next_poll() -> None:
    part, more = session_part(
        Plan(retrieve=listed(20)), quit_every=5, max_retrieve=None, deletes_retrieved=False
    )
    assert (len(part.retrieve), more) == (20, False)
    part, more = session_part(
        Plan(retrieve=listed(20)), quit_every=50, max_retrieve=7, deletes_retrieved=True
    )
    assert (len(part.retrieve), more) == (7, False)


def test_only_rfc_1939_ids_listed_once_identify_a_message() -> None:
    uidls = {1: "ok", 2: "dup", 3: "dup", 4: "a b", 5: "x" * 71, 6: "", 7: "caf\u00e9"}
    sizes = dict.fromkeys([*uidls, 8], 10)  # 8: listed by LIST only
    listing = identify(uidls, sizes)
    assert [(m.number, m.uidl, m.by_content) for m in listing] == [
        (1, "ok", False),
        *((n, "", True) for n in range(2, 9)),
    ]


def test_a_message_identified_by_content_is_retrieved_even_if_its_listed_id_was_published() -> None:
    known = {"dup": recorded("dup", 100)}
    listing = [Listed(1, "", 100, by_content=True), Listed(2, "", 100, by_content=True)]
    plan = plan_pass(listing, known, mode="delete", max_message_size=50 * MB)
    assert plan.retrieve == listing
    assert plan.delete_only == []


def test_a_content_key_can_never_be_a_valid_uidl() -> None:
    key = content_key("ab" * 32)
    assert key == "~sha256:" + "ab" * 32
    assert not valid_unique_id(key)


def test_messages_found_too_big_by_their_bytes_are_too_big_whatever_list_claims() -> None:
    listing = [Listed(1, "a", 10), Listed(2, "b", 10)]
    plan = plan_pass(listing, {}, mode="delete", max_message_size=MB, too_big_uidls={"a"})
    assert (plan.too_big, plan.retrieve) == ([listing[0]], [listing[1]])


def test_messages_left_for_the_pass_are_in_no_list() -> None:
    listing = [
        Listed(1, "a", 10),
        Listed(2, "", 10, by_content=True),
        Listed(3, "c", 10),
        Listed(4, "", 9, True),
    ]
    plan = plan_pass(listing, {}, mode="delete", max_message_size=MB, leave={"a", ""}, leave_numbers={2})
    assert (plan.too_big, plan.retrieve) == ([], listing[2:])
