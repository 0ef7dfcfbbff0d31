"""services/router/stage.py: single-user mailboxes, catch-alls, unknown mailboxes, failures."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.events import MailFetched
from services.router.stage import route_fetched, to_postmaster
from services.runtime.settings import Mailbox, MailConfig, RoutingRules, SmtpTarget, rules_version

T = datetime(2026, 11, 27, 8, tzinfo=UTC)
RULES = RoutingRules(
    primary_domain="example.com",
    local_domains=("example.com",),
    postmaster="postmaster@example.com",
    users=("alice", "bob", "postmaster"),
    trusted_received_hosts=("mx.isp.example.net",),
)
CONFIG = MailConfig(
    delivery=SmtpTarget(host="127.0.0.1"),
    mailboxes=(
        Mailbox(id="alice", host="pop", username="a", password_env="P", recipients=("alice@example.com",)),
        Mailbox(id="catchall", host="pop", username="c", password_env="P", routing=RULES),
    ),
)
BCC = (
    b"Delivered-To: bob@example.com\r\n"
    b"Received: from out.sender.example by mx.isp.example.net with ESMTPS id 1;\r\n"
    b"\tFri, 27 Nov 2026 08:00:00 +0000\r\n"
    b"Return-Path: <sender@sender.example>\r\nMessage-ID: <m1@sender.example>\r\n"
    b"To: someone@outside.example\r\nSubject: hi\r\n\r\nbody\r\n"
)


def fetched(mailbox_id: str, raw: bytes) -> MailFetched:
    return MailFetched(
        fetch_id="f1",
        mailbox_id=mailbox_id,
        pop3_host="pop",
        uidl="u",
        size=len(raw),
        sha256="",
        fetched_at=T,
        raw=raw,
    )


def test_single_user_mailbox_goes_to_its_recipients_whatever_the_headers() -> None:
    routed = route_fetched(fetched("alice", BCC), CONFIG, T)
    assert [r.address for r in routed.recipients] == ["alice@example.com"]
    assert routed.reason == "single-user"


def test_catch_all_bcc_recipient_from_delivered_to() -> None:
    routed = route_fetched(fetched("catchall", BCC), CONFIG, T)
    assert [r.address for r in routed.recipients] == ["bob@example.com"]
    assert routed.reason == "delivered-to"
    assert routed.rules_version == rules_version(RULES)
    assert routed.message_id == "m1@sender.example"
    assert routed.envelope_sender == "sender@sender.example"
    assert routed.raw == BCC


def test_a_mailbox_gone_from_the_config_goes_to_the_postmaster() -> None:
    routed = route_fetched(fetched("removed", BCC), CONFIG, T)
    assert [r.address for r in routed.recipients] == ["postmaster@example.com"]
    assert routed.reason == "unknown-mailbox"


def test_a_routing_failure_still_moves_the_message_to_the_postmaster() -> None:
    routed = to_postmaster(fetched("catchall", BCC), CONFIG, T, "ValueError: boom")
    assert [r.address for r in routed.recipients] == ["postmaster@example.com"]
    assert routed.reason == "malformed"
    assert routed.raw == BCC
