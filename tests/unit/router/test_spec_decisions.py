"""One test per row of ROUTING.md section 5 ("Decisions and why"), named after the decision."""

from __future__ import annotations

from services.runtime.settings import RoutingRules
from tests.unit.router.messages import ISP_HOP, SENDER_HOP, isp_hop, route

POSTMASTER = ("postmaster@example.com",)
FORGED_BELOW = (
    "Delivered-To: alice@example.com",
    "X-Original-To: alice@example.com",
    "Received: from x.attacker.example by mx.isp.example.net with ESMTP id F for <alice@example.com>; date",
)


def test_trust_is_anchored_by_position_only_fields_above_the_topmost_isp_received_count(
    rules: RoutingRules,
) -> None:
    decision = route(rules, "X-Original-To: bob@example.com", isp_hop("<bob@example.com>"), *FORGED_BELOW)
    assert (decision.recipients, decision.reason) == (("bob@example.com",), "x-original-to")
    forged_only = route(rules, ISP_HOP, *FORGED_BELOW, "To: dave@example.com")
    assert (forged_only.recipients, forged_only.reason) == (("dave@example.com",), "to-cc-fallback")


def test_no_trusted_hop_means_no_envelope_data_at_all(rules: RoutingRules) -> None:
    # An ISP that adds no Received field: the forged top fields must not decide.
    decision = route(rules, "Delivered-To: alice@example.com", "X-Original-To: alice@example.com", SENDER_HOP)
    assert (decision.recipients, decision.reason) == (POSTMASTER, "postmaster-fallback")


def test_delivered_to_before_x_original_to_and_the_isp_mailbox_falls_through(rules: RoutingRules) -> None:
    # X-Original-To is before the ISP's alias expansion: sales would give alice and bob a copy each time.
    decision = route(rules, "Delivered-To: alice@example.com", "X-Original-To: sales@example.com", ISP_HOP)
    assert (decision.recipients, decision.reason) == (("alice@example.com",), "delivered-to")
    isp_mailbox = route(
        rules, "Delivered-To: mbox4711@isp.example.net", "X-Original-To: sales@example.com", ISP_HOP
    )
    assert (isp_mailbox.recipients, isp_mailbox.reason) == (
        ("alice@example.com", "bob@example.com"),
        "x-original-to",
    )


def test_envelope_data_is_decisive_even_when_it_resolves_only_to_unknown_users(rules: RoutingRules) -> None:
    # A Bcc to an unknown user must not be handed to whoever is named in To.
    decision = route(rules, "X-Original-To: former.employee@example.com", ISP_HOP, "To: bob@example.com")
    assert (decision.recipients, decision.reason) == (POSTMASTER, "x-original-to")


def test_list_rules_are_evaluated_before_the_envelope(rules: RoutingRules) -> None:
    decision = route(
        rules, "Delivered-To: alice@example.com", ISP_HOP, "List-Id: Announce <announce.lists.example.net>"
    )
    assert (decision.recipients, decision.reason) == (("lists@example.com",), "list-id")


def test_list_id_matches_the_exact_identifier_not_a_substring(rules: RoutingRules) -> None:
    spoofed = route(
        rules, "Delivered-To: alice@example.com", ISP_HOP, "List-Id: <x.announce.lists.example.net.evil>"
    )
    assert (spoofed.recipients, spoofed.reason) == (("alice@example.com",), "delivered-to")


def test_plus_extensions_are_stripped_not_kept(rules: RoutingRules) -> None:
    decision = route(rules, "Delivered-To: Bob+Shopping@example.com", ISP_HOP)
    assert (decision.recipients, decision.reason) == (("bob@example.com",), "delivered-to")


def test_the_loop_guard_is_more_than_max_received_before_everything_else(rules: RoutingRules) -> None:
    top = ("List-Id: <announce.lists.example.net>", "Delivered-To: alice@example.com", ISP_HOP)
    assert route(rules, *top, *[SENDER_HOP] * 49).reason == "list-id"  # exactly 50: not a loop
    looped = route(rules, *top, *[SENDER_HOP] * 50)
    assert (looped.recipients, looped.reason) == (POSTMASTER, "loop")


def test_a_nul_in_the_header_section_means_malformed_and_a_nul_in_the_body_is_irrelevant(
    rules: RoutingRules,
) -> None:
    malformed = route(rules, "Delivered-To: alice@example.com", ISP_HOP, "Subject: \x00")
    assert (malformed.recipients, malformed.reason) == (POSTMASTER, "malformed")
    body_only = route(rules, "Delivered-To: alice@example.com", ISP_HOP, body="\x00\r\n")
    assert body_only.reason == "delivered-to"


def test_a_field_holding_a_control_character_is_ignored_and_a_bare_cr_is_no_line_break(
    rules: RoutingRules,
) -> None:
    # A parser that splits on the lone CR would see a trusted "Delivered-To: alice" line of its own.
    decision = route(
        rules, "X-Injected: x\rDelivered-To: alice@example.com", "X-Original-To: dave@example.com", ISP_HOP
    )
    assert (decision.recipients, decision.reason) == (("dave@example.com",), "x-original-to")
    controlled = route(
        rules, "Delivered-To: alice@example.com\x1b", "X-Original-To: dave@example.com", ISP_HOP
    )
    assert controlled.reason == "x-original-to"


def test_non_ascii_or_invalid_utf8_local_parts_are_invalid(rules: RoutingRules) -> None:
    for local in ("jürgen", "j\udcfcrgen"):
        decision = route(
            rules, f"Delivered-To: {local}@example.com", "X-Original-To: dave@example.com", ISP_HOP
        )
        assert (decision.recipients, decision.reason) == (("dave@example.com",), "x-original-to")


def test_resent_to_and_resent_cc_take_precedence_in_the_fallback(rules: RoutingRules) -> None:
    decision = route(rules, "Resent-To: carol@example.com", "To: alice@example.com", "Cc: bob@example.com")
    assert (decision.recipients, decision.reason) == (("carol@example.com",), "to-cc-fallback")


def test_delivered_to_strip_prefix_applies_to_delivered_to_only(rules: RoutingRules) -> None:
    delivered = route(rules, "Delivered-To: mbox4711-carol@example.com", ISP_HOP)
    assert (delivered.recipients, delivered.reason) == (("carol@example.com",), "delivered-to")
    for name in ("Envelope-To", "X-Envelope-To", "X-RCPT-TO", "X-Original-To"):
        other = route(rules, f"{name}: mbox4711-carol@example.com", ISP_HOP)
        assert (other.recipients, other.reason) == (POSTMASTER, name.lower())
    fallback = route(rules, "To: mbox4711-carol@example.com")
    assert fallback.recipients == POSTMASTER
