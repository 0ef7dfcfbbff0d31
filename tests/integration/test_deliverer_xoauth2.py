"""XOAUTH2 towards an Exchange-Online-like server: aiosmtpd with a custom `auth_XOAUTH2` mechanism."""

from __future__ import annotations

import base64
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from services.deliverer.commands import smtp_password, smtp_token
from services.deliverer.smtp import SmtpTransport
from services.runtime.settings import SmtpTarget
from tests.support.deliverer import MESSAGE, smtp_target
from tests.support.smtp import serve_smtp, smtp_protocol

pytestmark = pytest.mark.integration

USER = "relay@example.com"
TOKEN = "eyJ0eXAi.right-token.sig"
SENDER = "bob@remote.example"
RECIPIENTS = ("alice@example.com", "carol@example.com")


class ExchangeLike:
    """Accepts `AUTH XOAUTH2` with the right bearer token; otherwise answers like Exchange Online:
    a 334 carrying base64 JSON error details, then (after the client's empty line) 535."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.empty_answers: list[bytes] = []
        self.logins = 0

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        blob = base64.b64decode(args[1]) if len(args) > 1 else b""
        if blob == f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode():
            self.logins += 1
            return AuthResult(success=True)
        answer = await server.challenge_auth('{"status":"401","schemes":"bearer","scope":"https://outlook"}')
        self.empty_answers.append(answer if isinstance(answer, bytes) else b"<missing>")
        return AuthResult(success=False, handled=False, message="535 5.7.3 Authentication unsuccessful")

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages.append(envelope.original_content or b"")
        return "250 2.0.0 queued"


@contextmanager
def exchange_like() -> Iterator[tuple[ExchangeLike, int]]:
    handler = ExchangeLike()
    # loopback; auth_required would warn without TLS
    with serve_smtp(smtp_protocol(handler, hostname="outlook.test", auth_require_tls=False)) as port:
        yield handler, port


def xoauth2_target(port: int, **changes: object) -> SmtpTarget:
    return smtp_target(port, username=USER, auth="xoauth2", **{"token_env": "SMTP_TOKEN", **changes})


async def deliver(target: SmtpTarget, environ: dict[str, str]) -> dict[str, tuple[str, int | None, str]]:
    assert smtp_password(target, environ) is None  # XOAUTH2 needs no password reference
    async with SmtpTransport(target, token=smtp_token(target, environ)) as transport:
        verdicts = await transport.deliver(SENDER, RECIPIENTS, MESSAGE)
    return {r: (v.outcome, v.smtp_code, v.text) for r, v in verdicts.items()}


async def test_the_right_token_is_accepted_and_every_recipient_delivered() -> None:
    with exchange_like() as (server, port):
        verdicts = await deliver(xoauth2_target(port), {"SMTP_TOKEN": TOKEN})
    assert [verdicts[r][0] for r in RECIPIENTS] == ["delivered", "delivered"]
    assert (server.logins, len(server.messages)) == (1, 1)


async def test_a_wrong_token_defers_every_recipient_and_never_shows_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "eyJ0eXAi.expired-token.sig"
    caplog.set_level(logging.DEBUG)
    with exchange_like() as (server, port):
        verdicts = await deliver(xoauth2_target(port), {"SMTP_TOKEN": wrong})

    assert {verdicts[r][:2] for r in RECIPIENTS} == {("deferred", 535)}
    assert "AUTH refused" in verdicts[RECIPIENTS[0]][2]
    assert server.empty_answers == [b""]  # the 334 challenge was answered with an empty line
    assert server.messages == []
    ours = [r.getMessage() for r in caplog.records
            if r.name.startswith(("services", "aiosmtplib", "popbridge"))]
    shown = "\n".join([*ours, *(text for _, _, text in verdicts.values())])
    assert wrong not in shown
    assert base64.b64encode(f"user={USER}\x01auth=Bearer {wrong}\x01\x01".encode()).decode() not in shown


async def test_the_token_command_runs_for_the_session() -> None:
    command = (sys.executable, "-c", f"print({TOKEN!r})")
    with exchange_like() as (_, port):
        verdicts = await deliver(xoauth2_target(port, token_env=None, token_command=command), {})
    assert [verdicts[r][0] for r in RECIPIENTS] == ["delivered", "delivered"]


async def test_a_failing_token_command_defers_without_showing_its_output() -> None:
    command = (sys.executable, "-c", f"print({TOKEN!r}); raise SystemExit(3)")
    with exchange_like() as (server, port):
        verdicts = await deliver(xoauth2_target(port, token_env=None, token_command=command), {})
    assert {verdicts[r][0] for r in RECIPIENTS} == {"deferred"}
    assert "exit status 3" in verdicts[RECIPIENTS[0]][2]
    assert TOKEN not in verdicts[RECIPIENTS[0]][2]
    assert server.empty_answers == []  # no AUTH was even tried
