"""The SMTP/LMTP adapter against real servers: aiosmtpd with scripted handlers, and Dovecot's LMTP."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from services.deliverer.smtp import SmtpTransport
from tests.support.deliverer import MESSAGE, smtp_target
from tests.support.dovecot import DovecotMailboxes, make_server_certificates
from tests.support.smtp import ReceivedMessage, SmtpSink, serve_smtp, smtp_protocol, unused_port

pytestmark = pytest.mark.integration

SENDER = "bob@remote.example"


class Recorder:
    """An aiosmtpd handler that records what it accepted and can hang or hang up after the data."""

    def __init__(self, *, after_data: str = "accept", data_reply: str = "250 2.0.0 queued") -> None:
        self.after_data = after_data
        self.data_reply = data_reply
        self.messages: list[bytes] = []
        self.sessions: set[int] = set()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.sessions.add(id(session))
        if self.after_data == "hang":
            await asyncio.sleep(30)
        if self.after_data == "drop":
            assert server.transport is not None
            server.transport.close()
        self.messages.append(envelope.original_content or b"")
        return self.data_reply


@contextmanager
def serve(handler: object, *, lmtp: bool = False, **smtp_kwargs: Any) -> Iterator[int]:
    protocol = smtp_protocol(handler, LMTP if lmtp else SMTP, hostname="mx.test", **smtp_kwargs)
    with serve_smtp(protocol) as port:
        yield port


async def deliver(
    port: int, recipients: tuple[str, ...], message: bytes = MESSAGE, **target: object
) -> dict[str, tuple[str, int | None, str | None]]:
    async with SmtpTransport(smtp_target(port, **target)) as transport:
        verdicts = await transport.deliver(SENDER, recipients, message)
    return {r: (v.outcome, v.smtp_code, v.enhanced_code) for r, v in verdicts.items()}


async def test_each_rcpt_reply_decides_for_its_own_recipient(smtp_sink: SmtpSink) -> None:
    replies = {"gone@example.com": "550 5.1.1 no such user", "full@example.com": "452 4.2.2 mailbox full"}
    smtp_sink.rcpt_reply = replies.get

    verdicts = await deliver(smtp_sink.port, ("alice@example.com", "gone@example.com", "full@example.com"))

    assert verdicts == {
        "alice@example.com": ("delivered", 250, None),
        "gone@example.com": ("failed", 550, "5.1.1"),
        "full@example.com": ("deferred", 452, "4.2.2"),
    }
    assert [m.rcpt_tos for m in smtp_sink.messages] == [("alice@example.com",)]


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [("451 4.3.0 try again later", "deferred"), ("554 5.6.0 content rejected", "failed")],
)
async def test_the_reply_after_the_data_decides_for_every_accepted_recipient(
    smtp_sink: SmtpSink, reply: str, outcome: str
) -> None:
    def data_reply(_: ReceivedMessage) -> str:
        return reply

    smtp_sink.data_reply = data_reply

    verdicts = await deliver(smtp_sink.port, ("alice@example.com", "bob@example.com"))

    assert {v[0] for v in verdicts.values()} == {outcome}
    assert {v[2] for v in verdicts.values()} == {reply[4:9]}


async def test_a_server_that_hangs_after_the_data_defers_within_the_timeout() -> None:
    with serve(Recorder(after_data="hang")) as port:
        started = asyncio.get_running_loop().time()
        verdicts = await deliver(port, ("alice@example.com",), timeout=0.5)
        assert asyncio.get_running_loop().time() - started < 5
    assert verdicts == {"alice@example.com": ("deferred", None, None)}


async def test_a_dropped_connection_defers_and_the_next_message_gets_a_new_one() -> None:
    recorder = Recorder(after_data="drop")
    with serve(recorder) as port:
        async with SmtpTransport(smtp_target(port)) as transport:
            first = await transport.deliver(SENDER, ["alice@example.com"], MESSAGE)
            recorder.after_data = "accept"
            second = await transport.deliver(SENDER, ["alice@example.com"], MESSAGE)
    assert first["alice@example.com"].outcome == "deferred"
    assert "connection" in first["alice@example.com"].text
    assert second["alice@example.com"].outcome == "delivered"


async def test_a_refused_connection_defers() -> None:
    verdicts = await deliver(unused_port(), ("alice@example.com",))
    assert verdicts == {"alice@example.com": ("deferred", None, None)}


async def test_sessions_are_reused_with_rset_between_messages() -> None:
    recorder = Recorder()
    with serve(recorder) as port:
        async with SmtpTransport(smtp_target(port, connections=1)) as transport:
            for _ in range(3):
                await transport.deliver(SENDER, ["alice@example.com"], MESSAGE)
    assert len(recorder.messages) == 3
    assert len(recorder.sessions) == 1


async def test_without_smtputf8_a_utf8_message_fails_clearly_and_others_still_go() -> None:
    recorder = Recorder()
    with serve(recorder, enable_SMTPUTF8=False) as port:
        async with SmtpTransport(smtp_target(port)) as transport:
            headers = await transport.deliver(
                SENDER, ["alice@example.com"], "Subject: Grüße\r\n\r\nHallo\r\n".encode()
            )
            address = await transport.deliver(SENDER, ["jörg@example.com", "alice@example.com"], MESSAGE)
    assert (headers["alice@example.com"].outcome, headers["alice@example.com"].enhanced_code) == (
        "failed",
        "5.6.9",
    )
    assert "SMTPUTF8" in headers["alice@example.com"].text
    assert (address["jörg@example.com"].outcome, address["jörg@example.com"].enhanced_code) == (
        "failed",
        "5.6.7",
    )
    assert address["alice@example.com"].outcome == "delivered"
    assert len(recorder.messages) == 1


async def test_smtputf8_is_used_when_the_server_offers_it(smtp_sink: SmtpSink) -> None:
    verdicts = await deliver(
        smtp_sink.port, ("jörg@example.com",), "Subject: Grüße\r\n\r\nHallo\r\n".encode()
    )
    assert verdicts["jörg@example.com"][0] == "delivered"
    assert "SMTPUTF8" in smtp_sink.messages[0].mail_options


async def test_lmtp_reads_one_reply_per_accepted_recipient() -> None:
    # aiosmtpd's LMTP answers once; two reply lines in one push stand for Dovecot's per-recipient replies.
    recorder = Recorder(data_reply="250 2.0.0 saved\r\n452 4.2.2 over quota")
    with serve(recorder, lmtp=True) as port:
        verdicts = await deliver(port, ("alice@example.com", "bob@example.com"), protocol="lmtp")
    assert verdicts == {
        "alice@example.com": ("delivered", 250, "2.0.0"),
        "bob@example.com": ("deferred", 452, "4.2.2"),
    }


class _Users:
    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and auth_data == LoginPassword(b"relay", b"s3cret-pw")
        return AuthResult(success=ok)


def _server_context(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    certs = make_server_certificates(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert_file, certs.key_file)
    return context, certs.ca_file


@pytest.mark.parametrize("password", ["s3cret-pw", "wrong-pw"])
async def test_starttls_with_a_verified_certificate_then_auth(tmp_path: Path, password: str) -> None:
    context, ca_file = _server_context(tmp_path)
    with serve(
        Recorder(), tls_context=context, require_starttls=True, authenticator=_Users(), auth_required=True
    ) as port:
        target = smtp_target(port, tls="starttls", ca_file=str(ca_file), username="relay", password_env="X")
        async with SmtpTransport(target, password) as transport:
            verdicts = await transport.deliver(SENDER, ["alice@example.com"], MESSAGE)
    verdict = verdicts["alice@example.com"]
    assert verdict.outcome == ("delivered" if password == "s3cret-pw" else "deferred")
    assert password not in repr(verdict)
    assert password not in repr(transport)


async def test_an_untrusted_certificate_defers_without_sending(tmp_path: Path) -> None:
    context, _ = _server_context(tmp_path)
    recorder = Recorder()
    with serve(recorder, tls_context=context, require_starttls=True) as port:
        verdicts = await deliver(port, ("alice@example.com",), tls="starttls")
    assert verdicts["alice@example.com"][0] == "deferred"
    assert recorder.messages == []


async def test_dovecot_lmtp_over_starttls_delivers_per_recipient(dovecot: DovecotMailboxes) -> None:
    alice, bob = dovecot.new_user("alice"), dovecot.new_user("bob")
    server = dovecot.server
    target = smtp_target(server.lmtp_port, protocol="lmtp", tls="starttls", ca_file=str(server.ca_file))
    recipients = [f"{alice.login}@example.com", "nobody-here@example.com", f"{bob.login}@example.com"]
    async with SmtpTransport(target) as transport:
        verdicts = await transport.deliver(SENDER, recipients, MESSAGE)
    assert [verdicts[r].outcome for r in recipients] == ["delivered", "failed", "delivered"]
    assert verdicts["nobody-here@example.com"].enhanced_code == "5.1.1"
    assert (dovecot.message_count(alice), dovecot.message_count(bob)) == (1, 1)
    [saved] = [
        p for p in dovecot.maildir(alice).glob("*/*") if p.is_file() and p.parent.name in ("new", "cur")
    ]
    assert saved.read_bytes().endswith(MESSAGE.replace(b"\r\n", b"\n"))


class TransactionCounter:
    """Records the RCPTs of each transaction; answers DATA with `data_reply`."""

    def __init__(self, data_reply: str = "250 2.0.0 queued") -> None:
        self.data_reply = data_reply
        self.transactions: list[list[str]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.transactions.append(list(envelope.rcpt_tos))
        return self.data_reply


@pytest.mark.parametrize("data_reply", ["250 2.0.0 queued", "554 5.7.1 no thanks"])
async def test_a_recipient_storm_goes_out_in_transactions_of_at_most_the_cap(data_reply: str) -> None:
    handler = TransactionCounter(data_reply)
    recipients = tuple(f"user{n}@example.com" for n in range(250))
    with serve(handler) as port:
        verdicts = await deliver(port, recipients, max_recipients_per_transaction=100)
    assert [len(t) for t in handler.transactions] == [100, 100, 50]
    assert [r for t in handler.transactions for r in t] == list(recipients)
    expected = ("delivered", 250, "2.0.0") if data_reply.startswith("250") else ("failed", 554, "5.7.1")
    assert set(verdicts.values()) == {expected}


class _EchoingRefusal:
    """Refuses every login quoting what it was sent: the SASL PLAIN blob, the password in base64, plain."""

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        blob = base64.b64encode(b"\0" + auth_data.login + b"\0" + auth_data.password).decode()
        alone = base64.b64encode(auth_data.password).decode()
        echo = f"535 5.7.8 refused {blob} ({alone}, {auth_data.password.decode()})"
        return AuthResult(success=False, handled=False, message=echo)


async def test_a_server_echoing_the_password_in_base64_gets_it_blanked_out() -> None:
    password = "s3cret-pw-long-enough"
    with serve(Recorder(), authenticator=_EchoingRefusal(), auth_require_tls=False) as port:
        target = smtp_target(port, username="relay", password_env="X")
        async with SmtpTransport(target, password) as transport:
            verdicts = await transport.deliver(SENDER, ["alice@example.com"], MESSAGE)
    verdict = verdicts["alice@example.com"]
    assert verdict.outcome == "deferred"
    assert verdict.text.count("<redacted>") == 3, verdict.text
    for leaked in (password, base64.b64encode(password.encode()).decode()):
        assert leaked not in verdict.text
    assert base64.b64encode(b"\0relay\0" + password.encode()).decode()[12:] not in verdict.text
