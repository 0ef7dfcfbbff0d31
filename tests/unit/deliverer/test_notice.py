"""services/deliverer/notice.py: the postmaster's notice about a dead letter, never a bounce."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default

from schemas.events import DeliveryDeadLettered, Recipient, RecipientsResolved
from services.deliverer.notice import postmaster_notice

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
RAW = (
    b"From: Bob <bob@remote.example>\r\nSubject: Gr\xc3\xbc\xc3\x9fe\r\nMessage-ID: <m1@remote.example>\r\n"
    b"\r\nHello\r\n"
)
FETCH_ID = "0123456789abcdef0123456789abcdef"


def dead_letter(
    recipient: str = "gone@example.com", smtp_text: str = "5.1.1 no such user"
) -> DeliveryDeadLettered:
    routed = RecipientsResolved(
        fetch_id=FETCH_ID, mailbox_id="catchall", pop3_host="pop.isp.example",
        message_id="<m1@remote.example>",
        envelope_sender="bob@remote.example", recipients=(Recipient(address=recipient, reason="r"),),
        reason="r", rules_version="v", routed_at=T0, raw=RAW,
    )
    return DeliveryDeadLettered(
        routed=routed, recipient=recipient, reason="rejected by the server", smtp_code=550,
        enhanced_code="5.1.1", smtp_text=smtp_text, attempts=1, dead_lettered_at=T0, server="mx.example:25",
    )


def parse(notice: bytes) -> EmailMessage:
    parsed = message_from_bytes(notice, policy=default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_the_notice_goes_to_the_postmaster_only_and_says_what_failed_and_how_to_redrive() -> None:
    notice = parse(postmaster_notice(dead_letter(), postmaster="postmaster@example.com", now=T0))

    assert notice["To"] == "postmaster@example.com"
    assert "bob@remote.example" not in notice["To"]
    assert notice["Auto-Submitted"] == "auto-generated"
    assert notice.get_content_type() == "text/plain"
    assert "gone@example.com" in notice["Subject"]
    body = notice.get_content()
    assert f"Fetch id:      {FETCH_ID}" in body
    assert "Recipient:     gone@example.com" in body
    assert "Reason:        rejected by the server" in body
    assert "Server reply:  550 5.1.1 no such user" in body
    assert "Subject:       Grüße" in body
    assert f"popbridge dlq retry {FETCH_ID[:12]} --recipient gone@example.com" in body
    assert "The sender was not notified" in body


def test_the_notice_is_the_same_for_the_same_dead_letter_and_its_lines_end_in_crlf() -> None:
    first = postmaster_notice(dead_letter(), postmaster="postmaster@example.com", now=T0)
    again = postmaster_notice(dead_letter(), postmaster="postmaster@example.com", now=T0)

    assert first == again
    assert first.count(b"\n") == first.count(b"\r\n")
    assert parse(first)["Message-ID"].endswith("@example.com>")


def test_control_characters_in_a_server_reply_cannot_add_header_fields() -> None:
    notice = postmaster_notice(dead_letter(smtp_text="5.1.1 gone\r\nBcc: evil@remote.example"),
                               postmaster="postmaster@example.com", now=T0)

    parsed = parse(notice)
    assert parsed["Bcc"] is None
    assert "5.1.1 gone Bcc: evil@remote.example" in parsed.get_content()
