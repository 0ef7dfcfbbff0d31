"""The eight steps of ROUTING.md section 4, in order, with their boundaries.

Over 500 lines on purpose: one file mirrors rules.py, so each step's cases sit beside its neighbours'.
"""

from __future__ import annotations

import pytest
from msgspec.structs import replace

from schemas.events import Evidence, Recipient
from services.router import rules as rules_module
from services.router.rules import REASONS, Decision, recipients_with_evidence, resolve
from services.runtime.settings import ListRule, RoutingRules
from tests.unit.router.messages import ISP_HOP, SENDER_HOP, isp_hop, message, route

POSTMASTER = ("postmaster@example.com",)


def with_rules(rules: RoutingRules, **changes: object) -> RoutingRules:
    return replace(rules, **changes)


# --- step 1: NUL --------------------------------------------------------------------------------------


def test_step_1_a_nul_in_the_header_section_goes_to_the_postmaster(rules: RoutingRules) -> None:
    decision = route(
        rules, "Delivered-To: alice@example.com", ISP_HOP, "Subject: a\x00b", "To: bob@example.com"
    )
    assert (decision.recipients, decision.reason) == (POSTMASTER, "malformed")
    assert decision.evidence[0].field == "Subject"
    assert decision.evidence[0].field_index == 2


def test_step_1_a_nul_in_a_line_that_is_no_field_is_still_malformed(rules: RoutingRules) -> None:
    assert route(rules, "To: alice@example.com", "junk\x00 without colon").reason == "malformed"


def test_step_1_a_nul_only_in_the_body_is_irrelevant(rules: RoutingRules) -> None:
    decision = route(rules, "Delivered-To: alice@example.com", ISP_HOP, body="binary\x00body\r\n")
    assert (decision.recipients, decision.reason) == (("alice@example.com",), "delivered-to")


def test_step_1_comes_before_the_loop_guard(rules: RoutingRules) -> None:
    assert route(rules, *[SENDER_HOP] * 60, "X-Bad: \x00").reason == "malformed"


# --- step 2: loop -------------------------------------------------------------------------------------


def test_step_2_exactly_max_received_is_not_a_loop(rules: RoutingRules) -> None:
    decision = route(rules, "Delivered-To: alice@example.com", ISP_HOP, *[SENDER_HOP] * 49)
    assert decision.reason == "delivered-to"


def test_step_2_one_more_than_max_received_is_a_loop(rules: RoutingRules) -> None:
    decision = route(rules, "Delivered-To: alice@example.com", ISP_HOP, *[SENDER_HOP] * 50)
    assert (decision.recipients, decision.reason) == (POSTMASTER, "loop")


def test_step_2_counts_received_fields_anywhere_in_any_case(rules: RoutingRules) -> None:
    fields = [SENDER_HOP.replace("Received:", "RECEIVED:")] * 25 + ["To: bob@example.com"] + [SENDER_HOP] * 26
    assert route(rules, *fields).reason == "loop"


def test_step_2_comes_before_list_rules(rules: RoutingRules) -> None:
    assert route(rules, "List-Id: <announce.lists.example.net>", *[SENDER_HOP] * 51).reason == "loop"


def test_step_2_uses_the_configured_limit(rules: RoutingRules) -> None:
    strict = with_rules(rules, max_received=2)
    assert route(strict, ISP_HOP, SENDER_HOP, "To: bob@example.com").reason == "to-cc-fallback"
    assert route(strict, ISP_HOP, SENDER_HOP, SENDER_HOP, "To: bob@example.com").reason == "loop"


def test_step_2_received_fields_in_the_body_do_not_count(rules: RoutingRules) -> None:
    body = (SENDER_HOP + "\r\n") * 60
    assert route(rules, "To: bob@example.com", body=body).reason == "to-cc-fallback"


# --- step 3: List-Id ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "<announce.lists.example.net>",
        "Announcements <announce.lists.example.net>",
        '"Announce, the list" <ANNOUNCE.Lists.Example.NET>',
        "announce.lists.example.net",
        "  announce.lists.example.net  ",
    ],
)
def test_step_3_a_matching_list_id_goes_to_the_list_mailbox(rules: RoutingRules, value: str) -> None:
    decision = route(rules, ISP_HOP, f"List-Id: {value}", "To: announce@lists.example.net")
    assert (decision.recipients, decision.reason) == (("lists@example.com",), "list-id")
    assert decision.evidence == (
        Evidence(source="list-id", field="List-Id", field_index=1, value=value.strip(" ")),
    )


@pytest.mark.parametrize(
    "value",
    [
        "<evil.announce.lists.example.net>",
        "<announce.lists.example.net.evil.example>",
        "<announce.lists.example>",
        "announce.lists.example.net <other.lists.example.net>",
        "<announce lists example net>",
        "< announce.lists.example.net >",
        "<announce.lists.example.net",
    ],
)
def test_step_3_a_list_id_that_only_contains_the_id_does_not_match(rules: RoutingRules, value: str) -> None:
    decision = route(rules, ISP_HOP, f"List-Id: {value}", "To: bob@example.com")
    assert decision.reason == "to-cc-fallback"


def test_step_3_list_rules_override_the_envelope(rules: RoutingRules) -> None:
    decision = route(
        rules, "Delivered-To: alice@example.com", ISP_HOP, "List-Id: <announce.lists.example.net>"
    )
    assert decision.reason == "list-id"


def test_step_3_any_list_id_field_counts_even_below_the_trusted_hop(rules: RoutingRules) -> None:
    decision = route(
        rules, ISP_HOP, "List-Id: <other.example>", SENDER_HOP, "list-id: <announce.lists.example.net>"
    )
    assert (decision.reason, decision.evidence[0].field_index) == ("list-id", 3)


def test_step_3_without_list_rules_list_id_is_ignored(rules: RoutingRules) -> None:
    no_lists = with_rules(rules, list_rules=())
    assert (
        route(no_lists, "List-Id: <announce.lists.example.net>", "To: bob@example.com").reason
        == "to-cc-fallback"
    )


def test_step_3_the_first_matching_rule_decides(rules: RoutingRules) -> None:
    two = with_rules(
        rules,
        list_rules=(
            ListRule(list_id="a.example", deliver_to="Dave@example.com"),
            ListRule(list_id="a.example", deliver_to="erin@example.com"),
        ),
    )
    assert route(two, "List-Id: <A.example>").recipients == ("dave@example.com",)


# --- step 4: the trusted hop --------------------------------------------------------------------------


def test_step_4_without_a_trusted_hop_envelope_headers_and_for_clauses_are_skipped(
    rules: RoutingRules,
) -> None:
    decision = route(
        rules,
        "Delivered-To: alice@example.com",
        "X-Original-To: alice@example.com",
        "Received: from a.example by mx.other-isp.example with ESMTP id X for <alice@example.com>; date",
        "To: bob@example.com",
    )
    assert (decision.recipients, decision.reason) == (("bob@example.com",), "to-cc-fallback")


def test_step_4_without_a_trusted_hop_and_no_fallback_it_is_the_postmaster(rules: RoutingRules) -> None:
    decision = route(rules, "Delivered-To: alice@example.com", "To: someone@elsewhere.example")
    assert (decision.recipients, decision.reason) == (POSTMASTER, "postmaster-fallback")
    assert decision.evidence[0].received_hop is None


def test_step_4_without_configured_trusted_hosts_there_is_no_trusted_block(rules: RoutingRules) -> None:
    untrusting = with_rules(rules, trusted_received_hosts=())
    assert (
        route(untrusting, "Delivered-To: alice@example.com", ISP_HOP, "To: bob@example.com").reason
        == "to-cc-fallback"
    )


# --- step 5: envelope headers in the trusted block ----------------------------------------------------


@pytest.mark.parametrize(
    "name", ["Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "X-RCPT-TO"]
)
def test_step_5_each_envelope_header_above_the_hop_decides_with_its_own_reason(
    rules: RoutingRules, name: str
) -> None:
    decision = route(rules, f"{name}: <Carol@Example.com>", ISP_HOP, "To: bob@example.com")
    assert (decision.recipients, decision.reason) == (("carol@example.com",), name.lower())
    assert decision.evidence == (
        Evidence(
            source=name.lower(),
            field=name,
            field_index=0,
            value="<Carol@Example.com>",
            received_hop="mx.isp.example.net",
        ),
    )


def test_step_5_envelope_headers_below_the_trusted_hop_are_never_trusted(rules: RoutingRules) -> None:
    decision = route(
        rules,
        ISP_HOP,
        "Delivered-To: alice@example.com",
        "X-Original-To: alice@example.com",
        "To: bob@example.com",
    )
    assert (decision.recipients, decision.reason) == (("bob@example.com",), "to-cc-fallback")


def test_step_5_the_configured_order_decides_not_the_field_order(rules: RoutingRules) -> None:
    decision = route(
        rules,
        "X-RCPT-TO: erin@example.com",
        "X-Original-To: dave@example.com",
        "Delivered-To: carol@example.com",
        ISP_HOP,
    )
    assert (decision.recipients, decision.reason) == (("carol@example.com",), "delivered-to")


def test_step_5_a_delivered_to_naming_only_the_isp_mailbox_falls_through(rules: RoutingRules) -> None:
    decision = route(
        rules, "Delivered-To: mbox4711@isp.example.net", "X-Original-To: dave@example.com", ISP_HOP
    )
    assert (decision.recipients, decision.reason) == (("dave@example.com",), "x-original-to")


@pytest.mark.parametrize(
    "value", ["", "<>", "   ", "undisclosed-recipients:;", "not-an-address", "a@mail.example.com"]
)
def test_step_5_a_field_without_a_valid_local_address_is_skipped_silently(
    rules: RoutingRules, value: str
) -> None:
    decision = route(rules, f"Delivered-To: {value}", "Envelope-To: dave@example.com", ISP_HOP)
    assert decision.reason == "envelope-to"


def test_step_5_envelope_data_is_decisive_even_for_unknown_users(rules: RoutingRules) -> None:
    decision = route(rules, "X-Original-To: mallory@example.com", ISP_HOP, "To: bob@example.com")
    assert (decision.recipients, decision.reason) == (POSTMASTER, "x-original-to")


def test_step_5_every_field_of_the_deciding_name_counts(rules: RoutingRules) -> None:
    decision = route(
        rules,
        "Delivered-To: bob@example.com",
        "Received: by pop.isp.example.net with LMTP; date",
        "Delivered-To: sales@example.org, mbox4711@isp.example.net",
        ISP_HOP,
    )
    assert decision.recipients == ("alice@example.com", "bob@example.com")
    assert [e.field_index for e in decision.evidence] == [0, 2]
    assert decision.recipient_evidence == ((1,), (0, 1))


def test_step_5_a_field_with_a_control_character_is_ignored(rules: RoutingRules) -> None:
    decision = route(
        rules, "Delivered-To: alice@example.com\rbob@example.com", "X-Original-To: dave@example.com", ISP_HOP
    )
    assert (decision.recipients, decision.reason) == (("dave@example.com",), "x-original-to")


def test_step_5_the_strip_prefix_applies_to_delivered_to_only(rules: RoutingRules) -> None:
    delivered = route(rules, "Delivered-To: mbox4711-alice@example.com", ISP_HOP)
    assert (delivered.recipients, delivered.reason) == (("alice@example.com",), "delivered-to")
    original = route(rules, "X-Original-To: mbox4711-alice@example.com", ISP_HOP)
    assert (original.recipients, original.reason) == (POSTMASTER, "x-original-to")


def test_step_5_a_configured_custom_envelope_header_gives_its_lowercased_name(rules: RoutingRules) -> None:
    custom = with_rules(rules, envelope_headers=("X-Envelope-Recipient",))
    decision = route(custom, "X-Envelope-Recipient: frank@example.com", ISP_HOP)
    assert (decision.recipients, decision.reason) == (("frank@example.com",), "x-envelope-recipient")


# --- step 6: the trusted hop's for clause -------------------------------------------------------------


def test_step_6_the_trusted_for_clause_decides_when_no_envelope_header_does(rules: RoutingRules) -> None:
    decision = route(
        rules, "Delivered-To: mbox4711@isp.example.net", isp_hop("<Info@example.org>"), "To: bob@example.com"
    )
    assert (decision.recipients, decision.reason) == (("carol@example.com",), "received-for")
    (evidence,) = decision.evidence
    assert (evidence.field, evidence.field_index, evidence.received_hop) == (
        "Received",
        1,
        "mx.isp.example.net",
    )
    assert evidence.value is not None
    assert "for <Info@example.org>" in evidence.value


@pytest.mark.parametrize(
    "for_clause",
    [
        "alice@example.com",
        "<alice@example.com>",
        "<alice@example.com>, <bob@example.com>",
        "<alice@example.com> (single-drop)",
    ],
)
def test_step_6_the_for_clause_is_an_address_list_with_or_without_brackets(
    rules: RoutingRules, for_clause: str
) -> None:
    decision = route(rules, isp_hop(for_clause))
    assert decision.reason == "received-for"
    assert decision.recipients[0] == "alice@example.com"


def test_step_6_only_the_trusted_received_is_consulted(rules: RoutingRules) -> None:
    lower = "Received: from a by mx.isp.example.net with ESMTP id LOW for <alice@example.com>; date"
    decision = route(rules, isp_hop(""), lower, "To: bob@example.com")
    assert (decision.recipients, decision.reason) == (("bob@example.com",), "to-cc-fallback")


def test_step_6_a_for_clause_naming_only_the_isp_mailbox_falls_through(rules: RoutingRules) -> None:
    assert route(rules, ISP_HOP, "To: bob@example.com").reason == "to-cc-fallback"


def test_step_6_a_control_character_in_the_trusted_received_voids_its_for_clause(rules: RoutingRules) -> None:
    received = isp_hop("<alice@example.com>").replace("(Postfix)", "(Post\x1bfix)")
    decision = route(rules, received, "To: bob@example.com")
    assert decision.reason == "to-cc-fallback"


def test_step_6_a_for_clause_naming_an_unknown_user_is_decisive(rules: RoutingRules) -> None:
    decision = route(rules, isp_hop("<nobody@example.com>"), "To: bob@example.com")
    assert (decision.recipients, decision.reason) == (POSTMASTER, "received-for")


# --- step 7: fallback headers -------------------------------------------------------------------------


def test_step_7_to_and_cc_are_the_last_resort(rules: RoutingRules) -> None:
    decision = route(
        rules,
        ISP_HOP,
        "To: Bob <bob@example.com>, friend@elsewhere.example",
        "Cc: erin@example.org",
        "cc: bob@example.com",
    )
    assert (decision.recipients, decision.reason) == (
        ("bob@example.com", "erin@example.com"),
        "to-cc-fallback",
    )
    assert [e.field for e in decision.evidence] == ["To", "Cc", "cc"]
    assert decision.evidence[0].received_hop is None


def test_step_7_resent_fields_take_precedence_over_to_and_cc(rules: RoutingRules) -> None:
    decision = route(
        rules, "Resent-Cc: dave@example.com", "Resent-To: erin@example.com", "To: bob@example.com"
    )
    assert (decision.recipients, decision.reason) == (
        ("dave@example.com", "erin@example.com"),
        "to-cc-fallback",
    )


def test_step_7_an_existing_resent_field_without_local_addresses_still_hides_to(rules: RoutingRules) -> None:
    decision = route(rules, "Resent-To: someone@elsewhere.example", "To: bob@example.com")
    assert (decision.recipients, decision.reason) == (POSTMASTER, "postmaster-fallback")


def test_step_7_fallback_fields_count_anywhere_in_the_header(rules: RoutingRules) -> None:
    decision = route(rules, ISP_HOP, SENDER_HOP, "To: frank@example.com")
    assert decision.recipients == ("frank@example.com",)


def test_step_7_never_strips_the_delivered_to_prefix(rules: RoutingRules) -> None:
    assert route(rules, "To: mbox4711-alice@example.com").recipients == POSTMASTER


# --- step 8 and the output ----------------------------------------------------------------------------


def test_step_8_nothing_named_a_local_address(rules: RoutingRules) -> None:
    decision = route(rules, ISP_HOP, "To: someone@elsewhere.example", "From: alice@example.com")
    assert (decision.recipients, decision.reason) == (POSTMASTER, "postmaster-fallback")
    assert decision.evidence[0].received_hop == "mx.isp.example.net"


def test_an_empty_message_goes_to_the_postmaster(rules: RoutingRules) -> None:
    assert resolve(b"", rules).recipients == POSTMASTER


def test_recipients_are_sorted_lowercase_and_deduplicated(rules: RoutingRules) -> None:
    decision = route(rules, "To: Sales@Example.com, BOB@example.org, bob+x@example.com, Alice@example.com")
    assert decision.recipients == ("alice@example.com", "bob@example.com")


def test_only_local_addresses_are_ever_output(rules: RoutingRules) -> None:
    decision = route(
        rules, "To: a@elsewhere.example, b@example.com.elsewhere.example", "Cc: dave@example.com"
    )
    assert decision.recipients == ("dave@example.com",)


def test_to_json_dict_is_the_route_output(rules: RoutingRules) -> None:
    decision = route(rules, "X-Original-To: sales@example.com", ISP_HOP)
    assert decision.to_json_dict() == {
        "recipients": ["alice@example.com", "bob@example.com"],
        "reason": "x-original-to",
        "evidence": [
            {
                "source": "x-original-to",
                "field": "X-Original-To",
                "field_index": 0,
                "value": "sales@example.com",
                "received_hop": "mx.isp.example.net",
            }
        ],
    }


def test_evidence_values_are_truncated_and_undecodable_bytes_replaced(rules: RoutingRules) -> None:
    decision = route(
        rules, "To: bob@example.com, caf\udce9 <x@y.example>, " + "z" * 400 + "@elsewhere.example"
    )
    value = decision.evidence[0].value
    assert value is not None
    assert len(value) == 300
    assert "caf\ufffd" in value


def test_recipients_with_evidence_name_the_fields_that_chose_each_address(rules: RoutingRules) -> None:
    decision = route(rules, "Delivered-To: bob@example.com", "Delivered-To: sales@example.com", ISP_HOP)
    by_address = {recipient.address: recipient for recipient in recipients_with_evidence(decision)}
    assert [e.field_index for e in by_address["alice@example.com"].evidence] == [1]
    assert [e.field_index for e in by_address["bob@example.com"].evidence] == [0, 1]
    assert {recipient.reason for recipient in by_address.values()} == {"delivered-to"}


def test_recipients_with_evidence_of_a_single_evidence_decision(rules: RoutingRules) -> None:
    decision = route(rules, "List-Id: <announce.lists.example.net>")
    assert recipients_with_evidence(decision) == (
        Recipient(address="lists@example.com", reason="list-id", evidence=decision.evidence),
    )


def test_resolve_never_raises_even_on_a_bug(rules: RoutingRules, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(raw: bytes) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(rules_module, "read_header", broken)
    decision = resolve(b"To: bob@example.com\r\n\r\n", rules)
    assert (decision.recipients, decision.reason) == (POSTMASTER, "malformed")
    assert decision.evidence[0].value == "the router failed on this message: RuntimeError"


def test_decisions_use_only_the_reasons_of_the_spec(rules: RoutingRules) -> None:
    samples = [
        message("To: bob@example.com"),
        message("Delivered-To: bob@example.com", ISP_HOP),
        message(isp_hop("<bob@example.com>")),
        message("X-Bad: \x00"),
    ]
    assert {resolve(raw, rules).reason for raw in samples} <= REASONS


def test_a_decision_is_a_frozen_value(rules: RoutingRules) -> None:
    decision = route(rules, "To: bob@example.com")
    assert decision == Decision(
        recipients=("bob@example.com",),
        reason="to-cc-fallback",
        evidence=decision.evidence,
        recipient_evidence=((0,),),
    )
    with pytest.raises(AttributeError):
        decision.reason = "loop"  # type: ignore[misc]  # proving it is frozen


# --- ROUTING.md section 6: local parts that could route elsewhere ---------------------------------------

HOSTILE = (
    "evil%outside.test@example.com", '"evil@outside.test"@example.com', "outside.test!evil@example.com",
    '"@outside.test:evil"@example.com', "evil%outside.test@example.org",
)


@pytest.mark.parametrize("users", [None, ("alice", "bob", "postmaster")], ids=["no-users", "users"])
@pytest.mark.parametrize(
    "fields",
    [
        [f"Delivered-To: {a}" for a in HOSTILE] + [ISP_HOP],
        [f"X-Original-To: {a}" for a in HOSTILE] + [ISP_HOP],
        [isp_hop(", ".join(HOSTILE))],
        [f"To: {', '.join(HOSTILE)}", "Cc: <evil%outside.test@example.com>"],
        [f"Resent-To: {HOSTILE[0]}", "To: alice@example.com"],
    ],
    ids=["delivered-to", "x-original-to", "received-for", "to-cc", "resent-to"],
)
def test_unsafe_local_parts_reach_only_the_postmaster_whatever_the_header(
    rules: RoutingRules, users: tuple[str, ...] | None, fields: list[str]
) -> None:
    decision = route(with_rules(rules, users=users), *fields)
    assert (decision.recipients, decision.reason) == (POSTMASTER, "unsafe-local-part")
    assert [r.reason for r in recipients_with_evidence(decision)] == ["unsafe-local-part"]


def test_an_unsafe_local_part_beside_a_user_gives_the_postmaster_its_own_reason(rules: RoutingRules) -> None:
    decision = route(with_rules(rules, users=None), "Delivered-To: zoe@example.com",
                     "Delivered-To: evil%outside.test@example.com", ISP_HOP)
    expected = ("postmaster@example.com", "zoe@example.com")
    assert (decision.recipients, decision.reason) == (expected, "delivered-to")
    reasons = {r.address: r.reason for r in recipients_with_evidence(decision)}
    assert reasons == {"postmaster@example.com": "unsafe-local-part", "zoe@example.com": "delivered-to"}


def test_the_postmaster_named_safely_keeps_the_source_reason(rules: RoutingRules) -> None:
    decision = route(rules, "Delivered-To: postmaster@example.com", "Delivered-To: x!y@example.com", ISP_HOP)
    assert (decision.recipients, decision.reason) == (POSTMASTER, "delivered-to")
    assert decision.recipient_reasons == ()
