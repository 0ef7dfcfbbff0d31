"""services/deliverer/trace.py: the one Received field and nothing else changed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.deliverer.trace import line_ending_of, received_field, with_trace

AT = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)
FETCH_ID = "3f2a" * 8


def test_a_single_recipient_copy_names_the_recipient() -> None:
    field = received_field(
        pop3_host="pop.isp.example", fetch_id=FETCH_ID, at=AT, recipient="alice@example.com"
    )
    assert field == (
        b"Received: from pop.isp.example by popbridge with POP3\r\n"
        b" id <" + FETCH_ID.encode() + b"> for <alice@example.com>;\r\n"
        b" Tue, 01 Dec 2026 10:00:00 +0000\r\n"
    )


def test_a_copy_for_several_recipients_names_none() -> None:
    field = received_field(pop3_host="pop.isp.example", fetch_id=FETCH_ID, at=AT)
    assert field.replace(b"\r\n ", b" ") == (
        b"Received: from pop.isp.example by popbridge with POP3 id <" + FETCH_ID.encode() + b">;"
        b" Tue, 01 Dec 2026 10:00:00 +0000\r\n"
    )


def test_lines_stay_within_78_columns_and_fold_with_white_space() -> None:
    field = received_field(
        pop3_host="pop3.a-very-long-provider-name.example.net",
        fetch_id=FETCH_ID,
        at=AT,
        recipient="first.last+extension@subdomain.example.com",
    )
    lines = field.split(b"\r\n")[:-1]
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])


def test_the_date_keeps_its_zone() -> None:
    at = datetime(2026, 12, 1, 11, 0, tzinfo=timezone(timedelta(hours=1)))
    assert received_field(pop3_host="h", fetch_id="f", at=at).endswith(b"Tue, 01 Dec 2026 11:00:00 +0100\r\n")
    with pytest.raises(ValueError, match="timezone"):
        received_field(pop3_host="h", fetch_id="f", at=datetime(2026, 12, 1))


def test_hostile_values_cannot_break_the_field() -> None:
    field = received_field(pop3_host="evil\r\nBcc: x@y", fetch_id="f", at=AT, recipient="a b@x")
    assert field.count(b"\r\n") == field.count(b"\r\n ") + 1
    assert b"Bcc: x" not in field


def test_the_message_after_the_field_is_unchanged_and_the_line_ending_follows_it() -> None:
    message = b"Subject: x\n\nbody \xff\n"
    field = received_field(pop3_host="h", fetch_id="f", at=AT, line_ending=line_ending_of(message))
    assert b"\r" not in field
    assert with_trace(message, field) == field + message
    assert line_ending_of(b"Subject: x\r\n\r\n") == b"\r\n"
