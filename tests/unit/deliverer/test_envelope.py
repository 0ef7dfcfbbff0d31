"""services/deliverer/envelope.py: MAIL and RCPT parameters from the server's extensions."""

from __future__ import annotations

import pytest

from services.deliverer.envelope import Extensions, mail_from, plan, transactions, wire_data, xtext

ALL = Extensions({"size": "1000", "8bitmime": "", "smtputf8": "", "dsn": "", "pipelining": ""})
PLAIN = Extensions({})
ASCII = b"Subject: hi\r\n\r\nbody\r\n"


def test_size_and_dsn_when_offered() -> None:
    envelope = plan("bob@remote.example", ["a@x.example"], ASCII, ALL)
    assert envelope.mail_params == (f"SIZE={len(ASCII)}",)
    assert envelope.rcpt_params == {"a@x.example": ("NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;a@x.example")}
    assert plan("", ["a@x.example"], ASCII, PLAIN).mail_params == ()


def test_dsn_notify_is_sent_only_when_offered_and_orcpt_only_for_ascii_addresses() -> None:
    envelope = plan("bob@remote.example", ["a+b@x.example", "jörg@x.example"], ASCII, ALL)
    assert envelope.rcpt_params == {
        "a+b@x.example": ("NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;a+2Bb@x.example"),
        "jörg@x.example": ("NOTIFY=FAILURE,DELAY",),
    }
    assert plan("", ["a@x.example"], ASCII, PLAIN).rcpt_params == {"a@x.example": ()}


def test_eight_bit_bodies_are_declared() -> None:
    assert plan("", ["a@x"], b"S: x\r\n\r\n\xc3\xa9\r\n", ALL).mail_params[1:] == ("BODY=8BITMIME",)


def test_a_message_over_the_server_limit_fails_unsent() -> None:
    envelope = plan("", ["a@x"], b"x" * 2000, ALL)
    assert envelope.recipients == ()
    assert (envelope.refused["a@x"].outcome, envelope.refused["a@x"].enhanced_code) == ("failed", "5.3.4")


def test_without_smtputf8_a_utf8_recipient_fails_alone() -> None:
    envelope = plan("", ["jörg@x.example", "a@x.example"], ASCII, PLAIN)
    assert envelope.recipients == ("a@x.example",)
    assert envelope.refused["jörg@x.example"].enhanced_code == "5.6.7"


def test_without_smtputf8_utf8_headers_fail_everyone() -> None:
    envelope = plan("", ["a@x"], "Subject: Grüße\r\n\r\nbody\r\n".encode(), PLAIN)
    assert envelope.recipients == ()
    assert envelope.refused["a@x"].enhanced_code == "5.6.9"


def test_with_smtputf8_the_transaction_declares_it() -> None:
    envelope = plan("jörg@x.example", ["a@x"], ASCII, ALL)
    assert "SMTPUTF8" in envelope.mail_params
    assert envelope.refused == {}


def test_an_unusable_envelope_sender_becomes_the_null_sender() -> None:
    assert mail_from(None) == ""
    assert mail_from("") == ""
    assert mail_from("bob@remote.example") == "bob@remote.example"
    assert mail_from("bob smith@remote.example") == ""
    assert mail_from("a@b>\r\nRCPT TO:<c@d") == ""


def test_wire_data_stuffs_dots_and_ends_the_data() -> None:
    assert wire_data(b"a\r\n.b\r\n..c") == b"a\r\n..b\r\n...c\r\n.\r\n"
    assert wire_data(b"a\nb\n") == b"a\r\nb\r\n.\r\n"


def test_xtext() -> None:
    assert xtext("a+b=c@x") == "a+2Bb+3Dc@x"


def test_transactions_hold_at_most_the_cap_in_order() -> None:
    recipients = [f"u{n}@x.example" for n in range(250)]
    envelope = plan("bob@remote.example", recipients, ASCII, ALL)
    parts = transactions(envelope, 100)
    assert [len(p.recipients) for p in parts] == [100, 100, 50]
    assert [r for p in parts for r in p.recipients] == recipients
    assert all(set(p.rcpt_params) == set(p.recipients) for p in parts)
    assert {p.mail_params for p in parts} == {envelope.mail_params}
    assert transactions(plan("", ["a@x.example"], ASCII, ALL), 100)[0].recipients == ("a@x.example",)


@pytest.mark.parametrize("recipient", ["evil%outside.test@example.com", '"evil@outside.test"@example.com',
                                       "outside.test!evil@example.com", "a/b@example.com", ".a@example.com"])
def test_a_recipient_whose_local_part_could_route_elsewhere_is_never_sent(recipient: str) -> None:
    envelope = plan("", [recipient, "alice@example.com"], ASCII, ALL)
    assert envelope.recipients == ("alice@example.com",)
    assert envelope.refused[recipient].enhanced_code == "5.1.3"
    assert "route" in envelope.refused[recipient].text
