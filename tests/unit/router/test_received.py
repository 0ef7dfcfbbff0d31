"""The trusted Received hop and its `for` clause (ROUTING.md section 4, steps 4 and 6)."""

from __future__ import annotations

import pytest

from services.router.headers import read_header
from services.router.received import TrustedHop, normalize_host, received_clauses, trusted_hop

TRUSTED = frozenset({"mx.isp.example.net"})


def hop(*fields: str) -> TrustedHop | None:
    raw = ("\r\n".join(fields) + "\r\n\r\n").encode()
    return trusted_hop(read_header(raw).fields, TRUSTED)


# --- the by host --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "by_host"),
    [
        (
            "from a.example (a.example [192.0.2.1]) by mx.isp.example.net (Postfix) with ESMTPS id X; date",
            "mx.isp.example.net",
        ),
        ("from a.example by MX.ISP.Example.NET with SMTP; date", "mx.isp.example.net"),
        ("from a.example by mx.isp.example.net. with SMTP; date", "mx.isp.example.net"),
        ("from a.example BY mx.isp.example.net; date", "mx.isp.example.net"),
        ("by mx.isp.example.net;date", "mx.isp.example.net"),
        (
            "from a.example\r\n\tby\r\n mx.isp.example.net\r\n\twith ESMTP; date".replace("\r\n", ""),
            "mx.isp.example.net",
        ),
        ("from a.example by mx.isp.example.net(Postfix); date", "mx.isp.example.net"),
        ("(qmail 12345 invoked from network); 26 Nov 2026 09:00:00 -0000", None),
        ("from a.example with SMTP; date", None),
        ("", None),
    ],
)
def test_the_by_host_is_the_token_after_the_word_by(value: str, by_host: str | None) -> None:
    assert received_clauses(value).by_host == by_host


@pytest.mark.parametrize(
    "value",
    [
        # Named in the from part: the sender's HELO or reverse DNS.
        "from mx.isp.example.net (mx.isp.example.net [203.0.113.9]) by relay.attacker.example; date",
        # Named in a comment, even one that reads "by ...".
        "from a.example (by mx.isp.example.net) by relay.attacker.example; date",
        "from a.example (helo=by mx.isp.example.net) by relay.attacker.example; date",
        # A HELO name "by" is the from part's host, not the keyword.
        "from by (mx.isp.example.net [203.0.113.9]) by relay.attacker.example; date",
        # Only the first by counts.
        "from a.example by relay.attacker.example by mx.isp.example.net; date",
        # A prefix or a subdomain is another host.
        "from a.example by mx.isp.example.net.attacker.example; date",
        "from a.example by mx.isp.example.ne; date",
        "from a.example by mx.isp.example.net..; date",
    ],
)
def test_a_trusted_host_elsewhere_than_the_by_token_does_not_count(value: str) -> None:
    assert received_clauses(value).by_host != "mx.isp.example.net"


def test_a_helo_named_by_does_not_hide_the_real_by_host() -> None:
    value = "from by (evil.example [198.51.100.66]) by mx.isp.example.net (Postfix) with ESMTP id X; date"
    assert received_clauses(value).by_host == "mx.isp.example.net"


def test_configured_hosts_compare_the_same_way() -> None:
    assert normalize_host("MX.ISP.Example.NET.") == "mx.isp.example.net"


# --- the topmost trusted hop --------------------------------------------------------------------------


def test_the_trusted_hop_is_the_topmost_received_by_a_trusted_host() -> None:
    found = hop(
        "Delivered-To: alice@example.com",
        "Received: by pop.isp.example.net (Dovecot) with LMTP id 1; date",
        "Received: from a.example by mx.isp.example.net with ESMTP id TOP for <alice@example.com>; date",
        "Received: from b.example by mx.isp.example.net with ESMTP id LOW for <bob@example.com>; date",
    )
    assert found == TrustedHop(field_index=2, by_host="mx.isp.example.net", for_clause=" <alice@example.com>")


def test_no_trusted_hop_without_a_qualifying_received() -> None:
    assert hop("Received: from mx.isp.example.net by relay.example; date", "To: alice@example.com") is None
    assert hop("X-Received: by mx.isp.example.net; date") is None


def test_no_trusted_hop_when_no_host_is_trusted() -> None:
    raw = b"Received: from a by mx.isp.example.net; date\r\n\r\n"
    assert trusted_hop(read_header(raw).fields, frozenset()) is None


# --- the for clause -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "for_clause"),
    [
        ("from a by mx with ESMTP id X for <alice@example.com>; Thu, 26 Nov 2026", " <alice@example.com>"),
        ("from a by mx with esmtp id 1r-0 for alice@example.com; Thu, 26 Nov 2026", " alice@example.com"),
        ("from a by mx id X for <a@example.com>, <b@example.com>; date", " <a@example.com>, <b@example.com>"),
        ("from a by mx id X for <a;b@example.com>; date", " <a;b@example.com>"),
        ('from a by mx id X for "a;b"@example.com; date', ' "a;b"@example.com'),
        ("from a by mx id X for <a@example.com> (a; comment); date", " <a@example.com> (a; comment)"),
        ("from a by mx id X FOR <a@example.com>; date", " <a@example.com>"),
        ("from a by mx id X for<a@example.com>; date", "<a@example.com>"),
        ("from a by mx id X for <a@example.com>", " <a@example.com>"),
        ("from a by mx id X\r\n\tfor <a@example.com>;\r\n\tdate".replace("\r\n", ""), " <a@example.com>"),
        ("from a by mx with ESMTP id X; date", None),
        ("from a (for <evil@example.com>) by mx id X; date", None),
        ("from for (evil.example) by mx id X; date", None),
    ],
)
def test_the_for_clause_runs_from_the_word_for_to_the_first_free_semicolon(
    value: str, for_clause: str | None
) -> None:
    assert received_clauses(value).for_clause == for_clause


def test_a_folded_for_clause_is_read_from_the_unfolded_value() -> None:
    found = hop(
        "Received: from a.example\r\n\tby mx.isp.example.net\r\n\tfor\r\n <alice@example.com>;\r\n\tdate"
    )
    assert found is not None
    assert found.for_clause == " <alice@example.com>"


@pytest.mark.parametrize(
    "value",
    [
        'from a by mx for "unterminated; date',
        "from a by mx for <unterminated; date",
        "from a (unterminated by mx",
        "((((",
    ],
)
def test_broken_received_values_do_not_raise(value: str) -> None:
    received_clauses(value)
