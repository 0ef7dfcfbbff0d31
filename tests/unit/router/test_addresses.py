"""RFC 5322 address lists and local-address resolution (ROUTING.md section 3)."""

from __future__ import annotations

import pytest
from msgspec.structs import replace

from services.router.addresses import Address, LocalPolicy, Route, format_address, parse_address_list
from services.runtime.settings import RoutingRules


def addresses(value: str) -> list[str]:
    return [format_address(address) for address in parse_address_list(value)]


# --- address-list syntax ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice@example.com", ["alice@example.com"]),
        ("<alice@example.com>", ["alice@example.com"]),
        ("Alice <alice@example.com>", ["alice@example.com"]),
        ("Alice Q. Public <alice@example.com>", ["alice@example.com"]),
        ('"Public, Alice" <alice@example.com>, bob@example.com', ["alice@example.com", "bob@example.com"]),
        ('"Bob <bob@example.com>" <alice@example.com>', ["alice@example.com"]),
        ("=?utf-8?Q?M=C3=BCller=2C_Erin?= <erin@example.com>", ["erin@example.com"]),
        (
            "Team: a@example.com, b@example.com;, c@example.com",
            ["a@example.com", "b@example.com", "c@example.com"],
        ),
        ("undisclosed-recipients:;", []),
        ("undisclosed-recipients: ;", []),
        ("", []),
        (" , ,, ", []),
        ("alice@example.com (Alice, the first)", ["alice@example.com"]),
        ("(lead) alice(x)@(y)example.com(z)", ["alice@example.com"]),
        (
            "alice@example.com (nested (comment, here)), bob@example.com",
            ["alice@example.com", "bob@example.com"],
        ),
        (r"alice@example.com (a \) quoted paren, b@x)", ["alice@example.com"]),
        ("<alice@example.com,bob@example.com>", []),
        ("<@relay1.example,@relay2.example:john.smith@example.com>", ["john.smith@example.com"]),
        ("Joe <@relay.example:joe@example.com>", ["joe@example.com"]),
        ("alice@example.com; bob@example.com", ["alice@example.com", "bob@example.com"]),
        ("alice@example.com,\tbob@example.com", ["alice@example.com", "bob@example.com"]),
    ],
)
def test_address_lists_are_parsed_as_rfc_5322_says(value: str, expected: list[str]) -> None:
    assert addresses(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "not an address, bob@example.com",
        "a@b@example.com, bob@example.com",
        "Alice <alice@example.com> trailing, bob@example.com",
        "<<alice@example.com>>, bob@example.com",
        "alice@, bob@example.com",
        "@example.com, bob@example.com",
        "alice.@example.com, bob@example.com",
        ".alice@example.com, bob@example.com",
        "al..ice@example.com, bob@example.com",
        "alice@example..com, bob@example.com",
        "alice@example.com., bob@example.com",
        "john smith@example.com, bob@example.com",
        '""@example.com, bob@example.com',
        "a@example.com@, bob@example.com",
        "<@relay.example joe@example.com>, bob@example.com",
        "Alice@Home <alice@example.com>, bob@example.com",
    ],
)
def test_an_invalid_entry_is_skipped_and_the_others_still_count(value: str) -> None:
    assert addresses(value)[-1:] == ["bob@example.com"]
    assert len(addresses(value)) == 1


@pytest.mark.parametrize(
    "value",
    [
        'bob@example.com, "unterminated alice@example.com',
        "bob@example.com, (unterminated alice@example.com",
        "bob@example.com, alice@[192.0.2.1",
        "bob@example.com, stray) alice@example.com",
        "bob@example.com, back\\slash alice@example.com",
        "bob@example.com, <alice@example.com, carol@example.com",  # commas inside <> do not separate
    ],
)
def test_an_unterminated_quote_comment_or_literal_ends_the_list(value: str) -> None:
    assert addresses(value) == ["bob@example.com"]


@pytest.mark.parametrize(
    "value",
    [
        "alice@example.com\x00",
        "alice@example.com\rBcc: bob@example.com",
        "alice@example.com\nBcc: bob@example.com",
        "alice@example.com,\x7f bob@example.com",
        "alice@example.com, \x1b[31m",
        '"\x01"@example.com, alice@example.com',
    ],
)
def test_a_control_character_anywhere_voids_the_whole_field(value: str) -> None:
    assert parse_address_list(value) == ()


def test_htab_is_not_a_control_character() -> None:
    assert addresses("\talice@example.com,\tbob@example.com") == ["alice@example.com", "bob@example.com"]


# --- local parts --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "local"),
    [
        ('"john.smith"@example.com', "john.smith"),
        ('"alice@example.com"@example.org', "alice@example.com"),
        (r'"a\"b\\c"@example.com', 'a"b\\c'),
        ('"john smith"@example.com', "john smith"),
        ('"john".smith@example.com', "john.smith"),
        ("=?utf-8?Q?alice?=@example.com", "=?utf-8?Q?alice?="),
        ("Alice+Tag@example.com", "Alice+Tag"),
    ],
)
def test_quotes_and_quoted_pairs_are_not_part_of_the_local_part(value: str, local: str) -> None:
    assert [address.local for address in parse_address_list(value)] == [local]


@pytest.mark.parametrize(
    "value",
    [
        "jürgen@example.com",
        '"jürgen"@example.com',
        "j\udcfcrgen@example.com",  # an 8-bit byte that is not UTF-8
        '"tab\there"@example.com',
    ],
)
def test_a_local_part_that_is_not_printable_ascii_makes_the_address_invalid(value: str) -> None:
    assert parse_address_list(value) == ()


def test_encoded_words_inside_an_addr_spec_are_never_decoded() -> None:
    # =?utf-8?Q?alice=40example.com?= would decode to alice@example.com: it must stay literal text.
    (address,) = parse_address_list("=?utf-8?Q?alice=40example.com?=@example.net")
    assert address == Address("=?utf-8?Q?alice=40example.com?=", "example.net")


def test_an_encoded_word_display_name_is_never_parsed_as_an_address() -> None:
    # The display name would decode to "<bob@example.com>"; it is display text and stays so.
    assert addresses("=?utf-8?Q?=3Cbob=40example=2Ecom=3E?= <alice@example.com>") == ["alice@example.com"]


# --- domains ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "domain"),
    [
        ("alice@EXAMPLE.Com", "example.com"),
        ("alice@müller.example", "xn--mller-kva.example"),
        ("alice@Müller.example", "xn--mller-kva.example"),
        ("alice@XN--MLLER-KVA.EXAMPLE", "xn--mller-kva.example"),
        ("alice@ex\u0430mple.com", "xn--exmple-4nf.com"),  # Cyrillic a: another domain entirely
        ("alice@[192.0.2.1]", "[192.0.2.1]"),
        ("alice@[IPv6:2001:DB8::1]", "[ipv6:2001:db8::1]"),
    ],
)
def test_domains_are_lowercased_and_u_labels_become_a_labels(value: str, domain: str) -> None:
    assert [address.domain for address in parse_address_list(value)] == [domain]


@pytest.mark.parametrize(
    "value",
    [
        "alice@m\udcfcller.example",  # invalid UTF-8
        "alice@MÜLLER.example",  # uppercase non-ASCII is not a U-label
        "alice@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",  # fullwidth "example" is not a U-label
        "alice@mu\u0308ller.example",  # not in NFC
        "alice@foo_bar.müller.example",  # an invalid label in an IDN
        "alice@" + "ü" * 64 + ".example",  # a label too long
    ],
)
def test_a_domain_with_invalid_utf8_or_an_invalid_label_is_invalid(value: str) -> None:
    assert parse_address_list(value) == ()


# --- local or not -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "alice@example.com",
        "alice@EXAMPLE.COM",
        "alice@example.org",
        "alice@müller.example",
        "alice@xn--mller-kva.example",
    ],
)
def test_local_means_the_domain_equals_a_local_or_alias_domain(rules: RoutingRules, address: str) -> None:
    (parsed,) = parse_address_list(address)
    assert LocalPolicy(rules).is_local(parsed)


@pytest.mark.parametrize(
    "address",
    [
        "alice@mail.example.com",
        "alice@lists.example.org",
        "alice@example.com.attacker.example",
        "alice@attacker-example.com",
        "alice@ex\u0430mple.com",  # Cyrillic a
        "alice@[192.0.2.1]",
        "alice@[example.com]",
        "mbox4711@isp.example.net",
    ],
)
def test_subdomains_suffixes_homographs_and_literals_are_not_local(rules: RoutingRules, address: str) -> None:
    (parsed,) = parse_address_list(address)
    assert not LocalPolicy(rules).is_local(parsed)


# --- resolution ---------------------------------------------------------------------------------------


def destinations(rules: RoutingRules, address: str, *, delivered_to: bool = False) -> tuple[str, ...]:
    (parsed,) = parse_address_list(address)
    return LocalPolicy(rules).destinations(parsed, delivered_to=delivered_to)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("alice@example.com", ("alice@example.com",)),
        ("ALICE@Example.Org", ("alice@example.com",)),
        ("John.Smith@müller.example", ("john.smith@example.com",)),
        ("bob+newsletter@example.com", ("bob@example.com",)),
        ("bob+a+b@example.com", ("bob@example.com",)),
        ("sales@example.org", ("alice@example.com", "bob@example.com")),
        ("Info+web@example.com", ("carol@example.com",)),
        ("mallory@example.com", ("postmaster@example.com",)),
        ("+tag@example.com", ("postmaster@example.com",)),
        ('"alice@example.com"@example.org', ("postmaster@example.com",)),
        ("mbox4711-alice@example.com", ("postmaster@example.com",)),
    ],
)
def test_local_addresses_resolve_to_users_aliases_or_the_postmaster(
    rules: RoutingRules, address: str, expected: tuple[str, ...]
) -> None:
    assert destinations(rules, address) == expected


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("mbox4711-alice@example.com", "alice@example.com"),
        ("MBOX4711-Alice@example.com", "alice@example.com"),
        ("mbox4711-bob+x@example.org", "bob@example.com"),
        ("alice@example.com", "alice@example.com"),
        ("mbox4711-@example.com", "postmaster@example.com"),
        ("xmbox4711-alice@example.com", "postmaster@example.com"),
    ],
)
def test_delivered_to_addresses_lose_the_strip_prefix(
    rules: RoutingRules, address: str, expected: str
) -> None:
    assert destinations(rules, address, delivered_to=True) == (expected,)


def test_without_a_user_list_every_local_part_is_accepted(rules: RoutingRules) -> None:
    open_rules = replace(rules, users=None)
    assert destinations(open_rules, "Zoe+x@example.org") == ("zoe@example.com",)
    assert destinations(open_rules, "sales@example.com") == ("alice@example.com", "bob@example.com")
    assert destinations(open_rules, "zoe.smith@example.com") == ("zoe.smith@example.com",)
    assert destinations(open_rules, "+x@example.com") == ("postmaster@example.com",)


# Local parts an MTA that trusts popbridge may read as a route elsewhere (ROUTING.md section 6).
HOSTILE_LOCAL_PARTS = [
    "evil%outside.test@example.com",
    "EVIL%Outside.Test@example.com",
    "evil%outside.test%example.com@example.com",
    '"evil@outside.test"@example.com',
    '"evil%outside.test"@example.com',
    "outside.test!evil@example.com",
    '"@outside.test:evil"@example.com',
    '"evil\\@outside.test"@example.com',
    "evil/outside.test@example.com",
    '"zoe smith"@example.com',
    '".evil"@example.com',
    '"evil."@example.com',
    '"a..b"@example.com',
    "mbox4711-evil%outside.test@example.com",
    "evil%outside.test+tag@example.com",
    "evil!outside.test@example.org",
]


@pytest.mark.parametrize("users", [None, ("alice", "bob")], ids=["no-users", "users"])
@pytest.mark.parametrize("address", HOSTILE_LOCAL_PARTS)
def test_a_local_part_that_could_route_elsewhere_reaches_only_the_postmaster(
    rules: RoutingRules, address: str, users: tuple[str, ...] | None
) -> None:
    policy = LocalPolicy(replace(rules, users=users))
    (parsed,) = parse_address_list(address)
    for delivered_to in (False, True):
        routes = policy.routes(parsed, delivered_to=delivered_to)
        assert routes == (Route("postmaster@example.com", unsafe=True),)


def test_an_obsolete_source_route_is_dropped_leaving_the_final_mailbox(rules: RoutingRules) -> None:
    open_rules = replace(rules, users=None)
    assert destinations(open_rules, "<@outside.test:zoe@example.com>") == ("zoe@example.com",)
    assert destinations(open_rules, "<@outside.test,@b.test:zoe@example.com>") == ("zoe@example.com",)


def test_a_route_character_after_the_extension_delimiter_is_cut_off_with_it(rules: RoutingRules) -> None:
    open_rules = replace(rules, users=None)
    assert destinations(open_rules, "zoe+evil%outside.test@example.com") == ("zoe@example.com",)


def test_unknown_local_user_may_name_another_mailbox(rules: RoutingRules) -> None:
    catchall = replace(rules, unknown_local_user="catchall")
    assert destinations(catchall, "mallory@example.com") == ("catchall@example.com",)


def test_postfix_style_delimiter_sets_cut_at_the_first_of_them(rules: RoutingRules) -> None:
    dashes = replace(rules, recipient_delimiter="+-")
    assert destinations(dashes, "bob-lists+x@example.com") == ("bob@example.com",)


def test_an_alias_with_no_targets_goes_to_the_postmaster(rules: RoutingRules) -> None:
    empty = replace(rules, aliases={"void": ()})
    assert destinations(empty, "void@example.com") == ("postmaster@example.com",)


def test_local_destinations_of_a_field_ignore_non_local_and_invalid_addresses(rules: RoutingRules) -> None:
    value = "Alice <alice@example.com>, x@mail.example.com, broken@, sales@example.org, y@gmail.example"
    assert LocalPolicy(rules).local_destinations(value) == [
        "alice@example.com",
        "alice@example.com",
        "bob@example.com",
    ]


def test_format_address_quotes_only_what_is_not_a_dot_atom() -> None:
    assert format_address(Address("john.smith", "example.com")) == "john.smith@example.com"
    assert format_address(Address('a "b"\\c', "example.com")) == '"a \\"b\\"\\\\c"@example.com'
    assert format_address(Address("a..b", "example.com")) == '"a..b"@example.com'
