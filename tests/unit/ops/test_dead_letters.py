"""services/ops/dead_letters.py: which dead letters an operator sees, and how `dlq list` shows them."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.events import DeliveryDeadLettered, RecipientDelivered, RecipientsResolved
from services.ops.dead_letters import (
    RetryPlan,
    latest_dead_letters,
    list_json,
    listed,
    matching,
    plan_retry,
    retry_json,
    retry_text,
    summary,
)

T = datetime(2026, 11, 27, 8, tzinfo=UTC)


def routed(fetch_id: str) -> RecipientsResolved:
    return RecipientsResolved(
        fetch_id=fetch_id, mailbox_id="mb", pop3_host="pop.example", message_id=None, envelope_sender=None,
        recipients=(), reason="delivered-to", rules_version="v1", routed_at=T, raw=b"Subject: x\r\n\r\n",
    )


def dead(fetch_id: str, recipient: str, reply: str, at: datetime = T) -> DeliveryDeadLettered:
    return DeliveryDeadLettered(routed=routed(fetch_id), recipient=recipient, reason="rejected",
                                smtp_code=550, smtp_text=reply, attempts=3, dead_lettered_at=at)


def test_the_latest_dead_letter_of_a_copy_is_the_one_shown() -> None:
    first = dead("f1", "bob@example.com", "no such user")
    again = dead("f1", "bob@example.com", "mailbox full")
    letters = latest_dead_letters([(2000, again), (1000, first)], [])
    assert [letter.event.smtp_text for letter in letters] == ["mailbox full"]


def test_a_copy_delivered_since_by_a_retry_is_marked_delivered() -> None:
    letters = [(1, dead("f1", "bob@example.com", "x")), (2, dead("f1", "carol@example.com", "y"))]
    delivered = [RecipientDelivered(fetch_id="f1", recipient="carol@example.com", delivered_at=T)]
    shown = {d.event.recipient: d.delivered_since for d in latest_dead_letters(letters, delivered)}
    assert shown == {"bob@example.com": False, "carol@example.com": True}


def test_a_dead_letter_is_found_by_a_prefix_of_its_fetch_id_and_its_recipient() -> None:
    letters = latest_dead_letters([(1, dead("abc123", "bob@example.com", "x")),
                                   (2, dead("abc123", "carol@example.com", "y")),
                                   (3, dead("xyz", "bob@example.com", "z"))], [])
    both = ["bob@example.com", "carol@example.com"]
    assert [d.event.recipient for d in matching(letters, "abc", None)] == both
    assert [d.event.recipient for d in matching(letters, "abc", "carol@example.com")] == ["carol@example.com"]
    assert matching(letters, "nope", None) == []


def test_the_list_line_names_the_id_time_status_recipient_and_first_reply_line() -> None:
    letter = latest_dead_letters([(1, dead("f" * 20, "bob@example.com", "no such user\nmore"))], [])[0]
    assert summary(letter) == f"{'f' * 12}  2026-11-27 08:00  open       bob@example.com  550 no such user"


# --- list filters, JSON, retry plan --------------------------------------------------------------


def test_list_shows_open_copies_filtered_by_recipient_and_mailbox() -> None:
    letters = latest_dead_letters(
        [(1, dead("aaa", "Bob@example.com", "x")), (2, dead("bbb", "eve@example.com", "y"))],
        [RecipientDelivered(fetch_id="bbb", recipient="eve@example.com", delivered_at=T)],
    )
    assert [d.event.recipient for d in listed(letters)] == ["Bob@example.com"]
    both = ["Bob@example.com", "eve@example.com"]
    assert [d.event.recipient for d in listed(letters, show_all=True)] == both
    assert [d.event.recipient for d in listed(letters, recipient="bob@EXAMPLE.com")] == ["Bob@example.com"]
    assert listed(letters, mailbox="other") == []


def test_the_json_of_a_dead_letter_has_its_documented_keys_and_no_message_bytes() -> None:
    (letter,) = latest_dead_letters([(1, dead("f" * 32, "bob@example.com", "no such user"))], [])
    document = list_json([letter], T)
    assert document["since"] == "2026-11-27T08:00:00+00:00"
    (shown,) = document["dead_letters"]
    assert shown == {
        "id": "f" * 12, "fetch_id": "f" * 32, "status": "open", "recipient": "bob@example.com",
        "reason": "rejected", "smtp_code": 550, "enhanced_code": None, "smtp_text": "no such user",
        "server": "", "attempts": 3, "dead_lettered_at": "2026-11-27T08:00:00+00:00", "mailbox_id": "mb",
        "pop3_host": "pop.example", "message_id": None,
    }


def test_the_retry_plan_requeues_open_copies_and_leaves_those_delivered_since() -> None:
    letters = latest_dead_letters(
        [(1, dead("abc1", "bob@example.com", "x")), (2, dead("abc1", "eve@example.com", "x")),
         (3, dead("zzz9", "bob@example.com", "x"))],
        [RecipientDelivered(fetch_id="abc1", recipient="eve@example.com", delivered_at=T)],
    )
    plan = plan_retry(letters, "abc")
    assert [d.event.recipient for d in plan.requeue] == ["bob@example.com"]
    assert [d.event.recipient for d in plan.delivered] == ["eve@example.com"]
    assert [d.event.routed.fetch_id for d in plan_retry(letters, None).requeue] == ["abc1", "zzz9"]
    assert plan_retry(letters, "abc", "nobody@example.com") == RetryPlan((), ())
    dry = "dlq: 1 copies would be queued for retry (dry run: nothing changed)"
    assert retry_text(plan, executed=False)[-1] == dry
    assert retry_json(plan, executed=True)["executed"] is True
    assert [d["recipient"] for d in retry_json(plan, executed=True)["delivered_since"]] == ["eve@example.com"]
