"""Reading the header section exactly as ROUTING.md section 2 says, and the lookups other services use."""

from __future__ import annotations

import pytest

from services.router.headers import (
    Field,
    envelope_sender,
    first_value,
    header_fields,
    header_section,
    message_id,
    read_header,
)


def names_and_values(raw: bytes) -> list[tuple[str, str]]:
    return [(field.name, field.value) for field in read_header(raw).fields]


# --- the header section -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "section"),
    [
        (b"To: a@example.com\r\n\r\nTo: b@example.com\r\n", b"To: a@example.com\r\n"),
        (b"To: a@example.com\n\nTo: b@example.com\n", b"To: a@example.com\n"),
        (b"To: a@example.com\n\r\nbody", b"To: a@example.com\n"),
        (b"To: a@example.com\r\n", b"To: a@example.com\r\n"),
        (b"To: a@example.com", b"To: a@example.com"),
        (b"\r\nTo: a@example.com\r\n", b""),
        (b"\nTo: a@example.com\n", b""),
        (b"", b""),
    ],
    ids=[
        "crlf",
        "lf",
        "lf-then-crlf",
        "no-empty-line",
        "no-line-break",
        "starts-empty-crlf",
        "starts-empty-lf",
        "empty",
    ],
)
def test_header_section_runs_to_the_first_empty_line_or_the_end(raw: bytes, section: bytes) -> None:
    assert header_section(raw) == section


def test_fields_in_the_body_are_not_header_fields() -> None:
    raw = b"To: a@example.com\r\n\r\nDelivered-To: b@example.com\r\n"
    assert names_and_values(raw) == [("To", " a@example.com")]


def test_a_line_holding_only_a_bare_cr_does_not_end_the_header_section() -> None:
    raw = b"To: a@example.com\r\n\r\r\nCc: b@example.com\r\n\r\n"
    assert [field.name for field in read_header(raw).fields] == ["To", "Cc"]


# --- lines and line endings ---------------------------------------------------------------------------


def test_a_bare_cr_is_a_character_inside_the_line() -> None:
    raw = b"To: a@example.com\rBcc: b@example.com\r\nCc: c@example.com\r\n\r\n"
    assert names_and_values(raw) == [("To", " a@example.com\rBcc: b@example.com"), ("Cc", " c@example.com")]


def test_the_cr_before_lf_belongs_to_the_line_ending() -> None:
    assert names_and_values(b"To: a@example.com\r\n\r\n") == [("To", " a@example.com")]


def test_a_cr_at_the_end_of_a_file_without_lf_is_content() -> None:
    assert names_and_values(b"To: a@example.com\r") == [("To", " a@example.com\r")]


def test_two_crs_before_lf_leave_one_inside_the_line() -> None:
    assert names_and_values(b"To: a@example.com\r\r\n\r\n") == [("To", " a@example.com\r")]


def test_lf_alone_ends_a_line() -> None:
    assert names_and_values(b"To: a@example.com\nCc: b@example.com\n\n") == [
        ("To", " a@example.com"),
        ("Cc", " b@example.com"),
    ]


# --- fields -------------------------------------------------------------------------------------------


def test_continuation_lines_are_unfolded_keeping_the_whitespace() -> None:
    raw = b"To: a@example.com,\r\n  b@example.com,\r\n\tc@example.com\r\n\r\n"
    assert names_and_values(raw) == [("To", " a@example.com,  b@example.com,\tc@example.com")]


def test_a_line_without_a_colon_is_ignored() -> None:
    raw = b"To: a@example.com\r\nthis line has no colon\r\nCc: b@example.com\r\n\r\n"
    assert names_and_values(raw) == [("To", " a@example.com"), ("Cc", " b@example.com")]


def test_a_continuation_of_an_ignored_line_is_ignored_with_it() -> None:
    raw = b"To: a@example.com\r\nno colon here\r\n , b@example.com\r\n\r\n"
    assert names_and_values(raw) == [("To", " a@example.com")]


def test_a_continuation_line_before_any_field_is_ignored() -> None:
    assert names_and_values(b" stray: continuation\r\nTo: a@example.com\r\n\r\n") == [
        ("To", " a@example.com")
    ]


def test_the_value_starts_after_the_first_colon() -> None:
    assert names_and_values(b"Received: by x; Thu, 26 Nov 2026 10:00:00 +0100\r\n\r\n") == [
        ("Received", " by x; Thu, 26 Nov 2026 10:00:00 +0100")
    ]


def test_field_names_compare_case_insensitively() -> None:
    (field,) = read_header(b"dELIVERED-tO: a@example.com\r\n\r\n").fields
    assert field == Field("dELIVERED-tO", "delivered-to", " a@example.com")


def test_whitespace_between_name_and_colon_is_obsolete_syntax_and_ignored() -> None:
    (field,) = read_header(b"To : a@example.com\r\n\r\n").fields
    assert field.key == "to"


def test_non_ascii_letters_never_fold_into_a_field_name() -> None:
    # U+212A KELVIN SIGN lowercases to "k" with str.lower(); a field name is compared in ASCII only.
    (field,) = read_header("\u212a: x\r\n\r\n".encode()).fields
    assert field.key == "\u212a"


def test_order_is_kept_and_index_zero_is_the_topmost_field() -> None:
    raw = b"Received: by c\r\nReceived: by b\r\nReceived: by a\r\n\r\n"
    assert [field.value for field in read_header(raw).fields] == [" by c", " by b", " by a"]


# --- bytes --------------------------------------------------------------------------------------------


def test_nul_in_the_header_section_is_reported() -> None:
    assert read_header(b"To: a@example.com\x00\r\n\r\nbody").has_nul


def test_nul_only_in_the_body_is_not() -> None:
    assert not read_header(b"To: a@example.com\r\n\r\nbody\x00").has_nul


def test_invalid_utf8_survives_reading_and_is_shown_as_replacement_in_public_values() -> None:
    raw = b"Subject: caf\xe9\r\n\r\n"
    assert read_header(raw).fields[0].value == " caf\udce9"
    assert header_fields(raw) == [("Subject", " caf\ufffd")]


def test_utf8_values_are_decoded() -> None:
    assert first_value("Subject: Grüße\r\n\r\n".encode(), "subject") == "Grüße"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r",
        b"\n",
        b":",
        b"\x00",
        b"\xff\xfe",
        b" \r\n\t",
        b"::::\r\n:\r\n",
        b"\r\r\r\n\n",
        b"a" * 10000,
    ],
)
def test_reading_never_raises(raw: bytes) -> None:
    read_header(raw)
    header_fields(raw)
    message_id(raw)
    envelope_sender(raw)
    first_value(raw, "To")


# --- lookups ------------------------------------------------------------------------------------------


def test_first_value_is_the_topmost_trimmed_value() -> None:
    raw = b"X-Spam: no\r\nx-spam:  yes \r\n\r\n"
    assert first_value(raw, "X-SPAM") == "no"
    assert first_value(raw, "Subject") is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<1234.5678@mail.example>", "1234.5678@mail.example"),
        ("  < 1234@mail.example >  ", "1234@mail.example"),
        ("(comment) <abc@x>", "abc@x"),
        ("no-brackets@mail.example", "no-brackets@mail.example"),
        ("", None),
        ("<>", None),
        ("<a@x\rInjected: yes>", None),
    ],
)
def test_message_id_is_the_addr_spec_inside_the_angle_brackets(value: str, expected: str | None) -> None:
    assert message_id(f"Message-ID: {value}\r\n\r\n".encode()) == expected


def test_message_id_is_none_when_absent_and_takes_the_topmost() -> None:
    assert message_id(b"To: a@example.com\r\n\r\n") is None
    assert message_id(b"Message-Id: <top@x>\r\nMessage-ID: <second@x>\r\n\r\n") == "top@x"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<bounce+123@Lists.Example.NET>", "bounce+123@lists.example.net"),
        ("<>", ""),
        (" < > ", ""),
        ("plain@sender.example", "plain@sender.example"),
        ("<@relay.example:user@sender.example>", "user@sender.example"),
        ('<"john smith"@sender.example>', '"john smith"@sender.example'),
        ("garbage", ""),
        ("<a@x>, <b@y>", ""),
    ],
)
def test_envelope_sender_comes_from_return_path(value: str, expected: str) -> None:
    assert envelope_sender(f"Return-Path: {value}\r\n\r\n".encode()) == expected


def test_envelope_sender_is_the_topmost_return_path_and_none_without_one() -> None:
    assert (
        envelope_sender(b"Return-Path: <a@x.example>\r\nReturn-Path: <b@y.example>\r\n\r\n") == "a@x.example"
    )
    assert envelope_sender(b"From: a@x.example\r\n\r\n") is None
