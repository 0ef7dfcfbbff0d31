"""services/router/dedupe.py: one delivery per recipient across the ISP's copies of a message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from schemas.events import Recipient, RecipientsResolved
from services.router.dedupe import apply_dedupe, body_digest, decode_seen, dedupe_key, encode_seen

T = datetime(2026, 11, 27, 8, tzinfo=UTC)


def copy(
    fetch_id: str, *recipients: str, body: bytes = b"hello\r\n", top: str = "X-Copy: 1"
) -> RecipientsResolved:
    raw = f"{top}\r\nMessage-ID: <m@x>\r\n\r\n".encode() + body
    return RecipientsResolved(
        fetch_id=fetch_id,
        mailbox_id="mb",
        pop3_host="pop",
        message_id="m@x",
        envelope_sender=None,
        recipients=tuple(Recipient(address=r, reason="delivered-to") for r in recipients),
        reason="delivered-to",
        rules_version="r",
        routed_at=T,
        raw=raw,
    )


def addresses(event: RecipientsResolved) -> list[str]:
    return [r.address for r in event.recipients]


def test_copies_for_different_recipients_each_deliver() -> None:
    first, seen = apply_dedupe(copy("f1", "alice@example.com"), {}, T)
    second, _ = apply_dedupe(copy("f2", "bob@example.com", top="X-Copy: 2"), seen, T)
    assert addresses(first) == ["alice@example.com"]
    assert addresses(second) == ["bob@example.com"]


def test_to_cc_fallback_copies_deliver_each_recipient_once() -> None:
    first, seen = apply_dedupe(copy("f1", "alice@example.com", "bob@example.com"), {}, T)
    second, _ = apply_dedupe(copy("f2", "alice@example.com", "bob@example.com", top="X-Copy: 2"), seen, T)
    assert addresses(first) == ["alice@example.com", "bob@example.com"]
    assert addresses(second) == []
    assert [(r.address, r.reason, r.evidence[0].value) for r in second.suppressed] == [
        ("alice@example.com", "duplicate", "f1"),
        ("bob@example.com", "duplicate", "f1"),
    ]


def test_a_different_body_is_not_a_duplicate() -> None:
    _, seen = apply_dedupe(copy("f1", "alice@example.com"), {}, T)
    second, _ = apply_dedupe(copy("f2", "alice@example.com", body=b"other\r\n"), seen, T)
    assert addresses(second) == ["alice@example.com"]


def test_the_same_copy_processed_again_is_emitted_again() -> None:
    # At-least-once: a crash after the table update but before the commit re-processes the copy.
    _, seen = apply_dedupe(copy("f1", "alice@example.com"), {}, T)
    again, _ = apply_dedupe(copy("f1", "alice@example.com"), seen, T)
    assert addresses(again) == ["alice@example.com"]


def test_entries_older_than_the_window_are_forgotten() -> None:
    _, seen = apply_dedupe(copy("f1", "alice@example.com"), {}, T)
    later, remembered = apply_dedupe(copy("f2", "alice@example.com"), seen, T + timedelta(days=8))
    assert addresses(later) == ["alice@example.com"]
    assert [c.first_seen for c in remembered.values()] == [T + timedelta(days=8)]


def test_a_message_without_message_id_has_no_dedupe_key() -> None:
    event = copy("f1", "alice@example.com")
    assert dedupe_key(event) == b"m@x"
    assert dedupe_key(msgspec.structs.replace(event, message_id=None)) is None


def test_single_user_mail_is_not_deduplicated() -> None:
    event = msgspec.structs.replace(copy("f1", "alice@example.com"), reason="single-user")
    assert dedupe_key(event) is None


def test_trace_fields_do_not_change_the_body_digest() -> None:
    assert body_digest(b"Received: a\r\n\r\nbody") == body_digest(b"Received: b\r\nX: y\r\n\r\nbody")
    assert body_digest(b"A: a\n\nbody") != body_digest(b"A: a\n\nbody2")


def test_table_values_round_trip() -> None:
    _, seen = apply_dedupe(copy("f1", "alice@example.com"), {}, T)
    assert decode_seen(encode_seen(seen)) == seen
    assert decode_seen(None) == {}

