"""Properties of the routing core over arbitrary and mutated input: total, local-only, never empty."""

from __future__ import annotations

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.router.addresses import parse_address_list
from services.router.headers import envelope_sender, first_value, header_fields, message_id, read_header
from services.router.received import received_clauses
from services.router.rules import resolve
from services.runtime.settings import RoutingRules, load_routing_rules
from tests.unit.router.messages import SPEC_EXAMPLE, assert_valid_decision, isp_hop
from tests.unit.router.test_realistic_headers import CASES, Case, raw

RULES: RoutingRules = load_routing_rules(SPEC_EXAMPLE)
QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FIELD_NAMES = [
    "Received", "Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "X-RCPT-TO",
    "To", "Cc", "Resent-To", "Resent-Cc", "List-Id", "Return-Path", "Message-ID", "received", "TO",
]  # fmt: skip
VALUE_PIECES = [
    "alice", "bob", "sales", "mbox4711-", "+ext", "@", "example.com", "example.org", "müller.example",
    "ex\u0430mple.com", "mx.isp.example.net", "isp.example.net", "by ", "for ", "from ", "<", ">", "<>", "(",
    ")", '"', "\\", ",", ";", ":", ".", " ", "\t", "\r", "\r\n ", "\x7f", "=?utf-8?Q?x?=",
    "[192.0.2.1]", "@a,@b:", "announce.lists.example.net", "\udcff", "ü",
]  # fmt: skip
ADDRESSES = [
    "alice@example.com", "Sales@Example.ORG", "bob+x@müller.example", "<carol@example.com>",
    "mbox4711-dave@example.com", "mbox4711@isp.example.net", "mallory@example.com", "x@mail.example.com",
    '"john.smith"@example.com', "Erin <erin@xn--mller-kva.example>", "from a by mx.isp.example.net for ",
    "<announce.lists.example.net>",
]  # fmt: skip


@QUICK
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_route_to_local_recipients(message: bytes) -> None:
    assert_valid_decision(resolve(message, RULES), message, RULES)


@st.composite
def header_like(draw: st.DrawFn) -> bytes:
    """Fields built from the pieces routing cares about, around the ISP's hop, joined by any line ending."""
    pieces = st.lists(st.sampled_from(VALUE_PIECES) | st.sampled_from(ADDRESSES), max_size=12).map("".join)
    value = st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=4).map(", ".join) | pieces
    fields = [
        f"{name}: {text}"
        for name, text in draw(st.lists(st.tuples(st.sampled_from(FIELD_NAMES), value), max_size=12))
    ]
    if draw(st.booleans()):
        fields.insert(draw(st.integers(min_value=0, max_value=len(fields))), isp_hop(draw(value)))
    eol = draw(st.sampled_from(["\r\n", "\n", "\r"]))
    text = eol.join(field.replace("\r\n", eol) for field in fields) + eol + eol + "body"
    return text.encode("utf-8", "surrogateescape")


@QUICK
@given(header_like())
def test_header_like_messages_route_to_local_recipients(message: bytes) -> None:
    assert_valid_decision(resolve(message, RULES), message, RULES)


MUTATION_BYTES = [
    b"\x00",
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n\r\n",
    b" ",
    b"\t",
    b":",
    b"<",
    b">",
    b"(",
    b'"',
    b"\xff",
    b"@",
]


@st.composite
def mutated_realistic(draw: st.DrawFn) -> bytes:
    """A realistic message with bytes inserted, deleted or replaced at random places."""
    message = bytearray(raw(draw(st.sampled_from(list(CASES.values())))))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        at = draw(st.integers(min_value=0, max_value=len(message)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.one_of(st.sampled_from(MUTATION_BYTES), st.binary(min_size=1, max_size=8)))
        if action == "insert":
            message[at:at] = piece
        elif action == "delete":
            del message[at : at + draw(st.integers(min_value=1, max_value=40))]
        else:
            message[at : at + len(piece)] = piece
    return bytes(message)


@QUICK
@given(mutated_realistic())
def test_mutated_realistic_messages_route_to_local_recipients(message: bytes) -> None:
    assert_valid_decision(resolve(message, RULES), message, RULES)


@QUICK
@given(st.sampled_from(list(CASES.values())), st.binary(max_size=500))
def test_the_body_never_changes_the_decision(case: Case, body: bytes) -> None:
    header = raw(case).split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    assert resolve(header + body, RULES) == resolve(header, RULES)


@QUICK
@given(st.lists(st.sampled_from(VALUE_PIECES), max_size=40).map("".join))
def test_parsed_addresses_are_printable_ascii_with_lowercase_ascii_domains(value: str) -> None:
    for address in parse_address_list(value):
        assert address.local
        assert address.local.isascii()
        assert address.local.isprintable()
        assert address.domain.isascii()
        assert address.domain == address.domain.lower()


@QUICK
@given(st.text(max_size=300))
def test_address_and_received_parsing_never_raise_on_any_text(value: str) -> None:
    parse_address_list(value)
    received_clauses(value)


@QUICK
@given(st.binary(max_size=2000))
def test_reading_keeps_every_field_line_in_order(message: bytes) -> None:
    header = read_header(message)
    assert all("\n" not in field.value for field in header.fields)


@QUICK
@given(st.binary(max_size=2000) | mutated_realistic())
def test_header_lookups_never_raise_and_give_encodable_text(message: bytes) -> None:
    found = [message_id(message), envelope_sender(message), first_value(message, "To")]
    msgspec.json.encode([found, header_fields(message)])
