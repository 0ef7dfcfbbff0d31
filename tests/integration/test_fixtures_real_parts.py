"""The real parts behave as the other tests rely on: Dovecot's POP3/POP3S/STLS/APOP/LMTP and the SMTP sink.

The byte-exactness study lives here too: every corpus file goes into a Maildir and comes back over
POP3 as `canonical_pop3_form()` says, and through smtplib into the sink as `smtp_transparent()` says.
"""

from __future__ import annotations

import poplib
import re
import smtplib
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.dovecot import DovecotMailboxes, MailUser
from tests.support.mail import canonical_pop3_form, pop3_octets, smtp_transparent
from tests.support.smtp import ReceivedMessage, SmtpSink

pytestmark = pytest.mark.integration

CORPUS = Path("/work/shared/corpus/public/messages")
CORPUS_FILES = sorted(path for path in CORPUS.rglob("*") if path.is_file())
SIMPLE = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: hello\r\n\r\nbody line\r\n.dotted\r\n"

# Stored bytes and what a POP3 client reads back (Dovecot 2.3.19.1), beyond what the corpus covers.
EDGE_CASES = [
    (b"", b"\r\n"),
    (b"x", b"x\r\n"),
    (b"a\r", b"a\r\r\n"),
    (b"a\rb\r\n", b"a\rb\r\n"),
    (b"a\r\r\nb\n", b"a\r\r\nb\r\n"),
    (b"a\x00b\xff\x80\r\n", b"a\x00b\xff\x80\r\n"),
    (b"a\n\r\n\n", b"a\r\n\r\n\r\n"),
    (b"x\r\n.\r\n..\r\n.x\n", b"x\r\n.\r\n..\r\n.x\r\n"),
    (b"a\r\n.", b"a\r\n.\r\n"),
]


@contextmanager
def pop3_session(dovecot: DovecotMailboxes, user: MailUser) -> Iterator[poplib.POP3]:
    client = poplib.POP3(dovecot.server.host, dovecot.server.pop3_port, timeout=30)
    try:
        client.user(user.login)
        client.pass_(user.password)
        yield client
    finally:
        client.quit()


def retrieve(client: poplib.POP3, number: int) -> bytes:
    """RETR as a client sees it: poplib removes the stuffed dots; the lines are joined with CRLF."""
    _, lines, _ = client.retr(number)
    return b"".join(line + b"\r\n" for line in lines)


def send(sink: SmtpSink, messages: list[bytes]) -> list[ReceivedMessage]:
    with smtplib.SMTP(sink.host, sink.port, timeout=30) as client:
        for raw in messages:
            client.sendmail("sender@example.test", ["rcpt@example.test"], raw)
    return sink.wait_for(len(messages))


# --- Dovecot: logins ------------------------------------------------------------------------------


def test_user_logs_in_with_user_and_pass_on_the_plain_port(dovecot: DovecotMailboxes) -> None:
    user = dovecot.new_user()
    with pop3_session(dovecot, user) as client:
        assert client.stat() == (0, 0)


def test_pop3s_certificate_verifies_against_the_test_ca_for_localhost(dovecot: DovecotMailboxes) -> None:
    user = dovecot.new_user()
    context = dovecot.server.client_tls_context()
    client = poplib.POP3_SSL("localhost", dovecot.server.pop3s_port, context=context, timeout=30)
    try:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in {"TLSv1.2", "TLSv1.3"}
        client.user(user.login)
        assert client.pass_(user.password).startswith(b"+OK")
    finally:
        client.quit()


def test_stls_upgrades_the_plain_port_with_a_verified_certificate(dovecot: DovecotMailboxes) -> None:
    user = dovecot.new_user()
    client = poplib.POP3(dovecot.server.host, dovecot.server.pop3_port, timeout=30)
    try:
        assert "STLS" in client.capa()
        client.stls(dovecot.server.client_tls_context())  # verifies the IP SAN 127.0.0.1
        client.user(user.login)
        assert client.pass_(user.password).startswith(b"+OK")
    finally:
        client.quit()


def test_apop_login_uses_the_timestamp_in_the_greeting(dovecot: DovecotMailboxes) -> None:
    user = dovecot.new_user()
    client = poplib.POP3(dovecot.server.host, dovecot.server.pop3_port, timeout=30)
    try:
        assert re.search(rb"<[^>]+@[^>]+>", client.getwelcome())
        assert client.apop(user.login, user.password).startswith(b"+OK")
    finally:
        client.quit()


def test_wrong_password_is_refused_with_the_auth_response_code(dovecot: DovecotMailboxes) -> None:
    user = dovecot.new_user()
    client = poplib.POP3(dovecot.server.host, dovecot.server.pop3_port, timeout=30)
    try:
        client.user(user.login)
        with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[AUTH\]"):
            client.pass_(user.password + "x")
    finally:
        client.quit()


def test_capa_advertises_pipelining_uidl_and_response_codes(dovecot: DovecotMailboxes) -> None:
    client = poplib.POP3(dovecot.server.host, dovecot.server.pop3_port, timeout=30)
    try:
        capabilities = client.capa()
    finally:
        client.quit()
    assert {"PIPELINING", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "TOP", "USER", "STLS"} <= set(capabilities)


# --- Dovecot: mail --------------------------------------------------------------------------------


def test_delivered_message_is_retrieved_with_a_stable_uidl(dovecot: DovecotMailboxes) -> None:
    user = dovecot.new_user()
    dovecot.deliver(user, SIMPLE)
    with pop3_session(dovecot, user) as client:
        assert retrieve(client, 1) == SIMPLE
        first_uidl = client.uidl(1)
    with pop3_session(dovecot, user) as client:
        assert client.uidl(1) == first_uidl
    assert re.fullmatch(rb"\+OK 1 [0-9A-Fa-f]{16}", first_uidl)


def test_users_of_one_test_see_only_their_own_mail(dovecot: DovecotMailboxes) -> None:
    alice, bob = dovecot.new_user("alice"), dovecot.new_user("bob")
    dovecot.deliver(alice, SIMPLE)
    assert (dovecot.message_count(alice), dovecot.message_count(bob)) == (1, 0)
    with pop3_session(dovecot, bob) as client:
        assert client.stat() == (0, 0)


def test_ten_thousand_messages_are_listed_in_delivery_order(dovecot: DovecotMailboxes) -> None:
    user = dovecot.new_user()
    dovecot.deliver_many(user, [b"Subject: %d\r\n\r\nbody\r\n" % n for n in range(10_000)])
    assert dovecot.message_count(user) == 10_000
    with pop3_session(dovecot, user) as client:
        assert client.stat()[0] == 10_000
        assert client.top(1, 0)[1][0] == b"Subject: 0"
        assert client.top(10_000, 0)[1][0] == b"Subject: 9999"


def test_lmtp_delivery_reaches_the_pop3_mailbox(dovecot: DovecotMailboxes) -> None:
    user = dovecot.new_user()
    with smtplib.LMTP(dovecot.server.host, dovecot.server.lmtp_port, timeout=30) as lmtp:
        refused = lmtp.sendmail("sender@example.test", [f"{user.login}@example.test"], SIMPLE)
    assert refused == {}
    with pop3_session(dovecot, user) as client:
        received = retrieve(client, 1)
    assert received.endswith(SIMPLE)
    assert f"Delivered-To: {user.login}@example.test".encode() in received


# --- Byte exactness: POP3 ------------------------------------------------------------------------


def test_every_corpus_file_comes_back_over_pop3_in_canonical_form(dovecot: DovecotMailboxes) -> None:
    assert len(CORPUS_FILES) == 273
    originals = [path.read_bytes() for path in CORPUS_FILES]
    user = dovecot.new_user()
    dovecot.deliver_many(user, originals)
    with pop3_session(dovecot, user) as client:
        sizes = [int(entry.split()[1]) for entry in client.list()[1]]
        received = [retrieve(client, number) for number in range(1, len(originals) + 1)]
    mismatched = [
        str(path) for path, sent, got in zip(CORPUS_FILES, originals, received, strict=True)
        if got != canonical_pop3_form(sent)
    ]  # fmt: skip
    assert mismatched == []
    assert sizes == [pop3_octets(original) for original in originals]


@pytest.mark.parametrize(("stored", "read"), EDGE_CASES)
def test_edge_cases_come_back_over_pop3_in_canonical_form(
    dovecot: DovecotMailboxes, stored: bytes, read: bytes
) -> None:
    user = dovecot.new_user()
    dovecot.deliver(user, stored)
    with pop3_session(dovecot, user) as client:
        assert retrieve(client, 1) == read == canonical_pop3_form(stored)


def test_dovecot_does_not_dot_stuff_the_first_line_of_a_message(dovecot: DovecotMailboxes) -> None:
    """Pins a Dovecot 2.3.19.1 defect (see tests/support/mail.py); if this fails, Dovecot fixed it."""
    user = dovecot.new_user()
    dovecot.deliver(user, b".first\r\n.second\r\n")
    with socket.create_connection((dovecot.server.host, dovecot.server.pop3_port), timeout=30) as sock:
        stream = sock.makefile("rwb")
        stream.readline()
        stream.write(f"USER {user.login}\r\nPASS {user.password}\r\nRETR 1\r\nQUIT\r\n".encode())
        stream.flush()
        replies = stream.read()
    assert b"+OK 17 octets\r\n.first\r\n..second\r\n.\r\n" in replies


# --- Byte exactness: SMTP ------------------------------------------------------------------------


def test_canonical_form_of_every_corpus_file_reaches_the_sink_unchanged(smtp_sink: SmtpSink) -> None:
    sent = [canonical_pop3_form(path.read_bytes()) for path in CORPUS_FILES]
    received = send(smtp_sink, sent)
    assert [message.content for message in received] == sent
    assert all(smtp_transparent(message) for message in sent)


def test_raw_corpus_files_reach_the_sink_unchanged_only_when_smtp_transparent(smtp_sink: SmtpSink) -> None:
    sent = [path.read_bytes() for path in CORPUS_FILES]
    received = send(smtp_sink, sent)
    unchanged = [message.content == raw for raw, message in zip(sent, received, strict=True)]
    assert unchanged == [smtp_transparent(raw) for raw in sent]
    assert sum(unchanged) == 113  # the other 160 lack a final CRLF or have a bare-LF line starting "."


def test_sink_records_envelope_and_8bit_smtputf8_content(smtp_sink: SmtpSink) -> None:
    content = "Subject: grüße\r\n\r\nnaïve \xff\r\n".encode("latin-1")
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=30) as client:
        client.ehlo()
        assert client.has_extn("smtputf8")
        assert client.has_extn("8bitmime")
        client.sendmail("jörg@example.test", ["zoë@example.test"], content, mail_options=["SMTPUTF8"])
    [message] = smtp_sink.wait_for(1)
    assert (message.mail_from, message.rcpt_tos, message.content) == (
        "jörg@example.test", ("zoë@example.test",), content,
    )  # fmt: skip
    assert "SMTPUTF8" in message.mail_options


def test_sink_takes_a_60_mb_message(smtp_sink: SmtpSink) -> None:
    content = b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * (60_000_000 // 78)
    [message] = send(smtp_sink, [content])
    assert message.content == content


def test_sink_answers_with_injected_rcpt_and_data_replies(smtp_sink: SmtpSink) -> None:
    smtp_sink.rcpt_reply = lambda address: "450 4.2.0 try later" if address.startswith("busy") else None
    smtp_sink.data_reply = lambda message: "554 5.6.0 rejected" if b"spam" in message.content else None
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=30) as client:
        refused = client.sendmail("s@example.test", ["busy@example.test", "ok@example.test"], SIMPLE)
        with pytest.raises(smtplib.SMTPDataError, match="rejected"):
            client.sendmail("s@example.test", ["ok@example.test"], b"Subject: spam\r\n\r\n")
    assert refused == {"busy@example.test": (450, b"4.2.0 try later")}
    assert [m.rcpt_tos for m in smtp_sink.wait_for(1)] == [("ok@example.test",)]
    assert [r.reply for r in smtp_sink.refused] == ["554 5.6.0 rejected"]
    assert [r.address for r in smtp_sink.refused_recipients] == ["busy@example.test"]
