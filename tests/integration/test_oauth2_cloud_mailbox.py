"""Cloud mailboxes end to end: `popbridge run` gets its own tokens from a real authorization server
(mock-oauth2-server) and drains a Dovecot that checks every XOAUTH2 token by introspection at that server.

A mailbox is configured with nothing but an [oauth2] table. The tokens never appear in the output, the
log, the events or the metrics' text.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from pathlib import Path

import msgspec
import pytest

from schemas import codec
from schemas.events import MailFetched
from schemas.topics import FETCHED
from services.runtime.embedded import EmbeddedLog
from services.runtime.oauth2 import TokenState
from services.runtime.oauth2_tokens import TokenStore, oauth2_directory
from tests.support.oauth2_server import APP_CLIENTS, AuthorizationServer, OAuth2Dovecot
from tests.support.smtp import SmtpSink

pytestmark = pytest.mark.integration

POPBRIDGE = str(Path(sys.executable).with_name("popbridge"))
SECRET_ENV = "TEST_OAUTH2_CLIENT_SECRET"


def mail(number: int) -> bytes:
    head = f"From: a@partner.example\r\nTo: alice@example.com\r\nSubject: cloud {number}\r\n"
    return (head + "\r\nHi.\r\n").encode()


def write_config(path: Path, dovecot: OAuth2Dovecot, sink: SmtpSink, login: str, oauth2: str) -> Path:
    path.write_text(f"""\
[delivery]
host = "{sink.host}"
port = {sink.port}
tls = "none"

[routing]
local_domains = ["example.com"]

[[mailboxes]]
id = "cloud"
host = "{dovecot.host}"
port = {dovecot.pop3_port}
tls = "none"
username = "{login}"
recipients = ["alice@example.com"]
oauth2 = {oauth2}
""")
    return path


async def run_until_idle(config: Path, data_dir: Path, secret: str, dovecot: OAuth2Dovecot) -> str:
    """`popbridge run --until-idle`; its whole output (JSON log lines and the summary)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POPBRIDGE_")}
    env |= {"POPBRIDGE_DATA_DIR": str(data_dir), SECRET_ENV: secret, "POPBRIDGE_LOG_LEVEL": "DEBUG"}
    process = await asyncio.create_subprocess_exec(
        POPBRIDGE, "run", "--config", str(config), "--until-idle", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-2000:] + dovecot.log_tail(30)
    return text


async def raw_events(data_dir: Path) -> list[MailFetched]:
    return [codec.decode(r.value, MailFetched) async for r in EmbeddedLog(data_dir).scan(FETCHED)]


def assert_no_token_anywhere(state: TokenState, *texts: str) -> None:
    for token in (state.access_token, state.refresh_token):
        if token:
            for text in texts:
                assert token not in text
                assert token[-40:] not in text  # not even the JWT's signature


async def test_app_only_mailbox_is_drained_through_dovecots_own_xoauth2_check(
    authorization_server: AuthorizationServer, oauth2_dovecot: OAuth2Dovecot, smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    login = APP_CLIENTS[0]  # its tokens carry sub = client_id
    oauth2_dovecot.add_user(login, secrets.token_urlsafe(12))
    oauth2_dovecot.deliver_many(login, [mail(1), mail(2)])
    table = (f'{{ token_url = "{authorization_server.token_url}", client_id = "{login}", '
             f'client_secret_env = "{SECRET_ENV}", grant = "client_credentials", scopes = ["pop"] }}')
    config = write_config(tmp_path / "popbridge.toml", oauth2_dovecot, smtp_sink, login, table)
    data_dir = tmp_path / "data"

    output = await run_until_idle(config, data_dir, "app-secret", oauth2_dovecot)

    assert oauth2_dovecot.message_count(login) == 0
    subjects = sorted(m.content.split(b"Subject: ")[1][:7] for m in smtp_sink.messages)
    assert subjects == [b"cloud 1", b"cloud 2"]
    cache = TokenStore(oauth2_directory(str(data_dir)))
    state = cache.load("cloud")
    assert state.access_token
    assert cache.path("cloud").stat().st_mode & 0o777 == 0o600
    events = await raw_events(data_dir)
    assert len(events) == 2
    assert_no_token_anywhere(state, output, msgspec.json.encode(events).decode(errors="replace"),
                             oauth2_dovecot.log_tail(400))


async def test_delegated_mailbox_renews_an_expired_access_token_with_its_refresh_token(
    authorization_server: AuthorizationServer, oauth2_dovecot: OAuth2Dovecot, smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    login = "cloud-refresh"  # the server's refresh_token grant gives this `sub`
    oauth2_dovecot.add_user(login, "unused-password")
    oauth2_dovecot.deliver(login, mail(3))
    table = (f'{{ token_url = "{authorization_server.token_url}", client_id = "refresh-client", '
             f'client_secret_env = "{SECRET_ENV}", scopes = ["pop", "offline_access"] }}')
    config = write_config(tmp_path / "popbridge.toml", oauth2_dovecot, smtp_sink, login, table)
    data_dir = tmp_path / "data"
    store = TokenStore(oauth2_directory(str(data_dir)))
    # What `popbridge oauth login` leaves behind, an hour later: an expired access token and the refresh
    # token (the device grant itself is not offered by this server; see tests/support/oauth2_server.py).
    store.save("cloud", TokenState(access_token="expired-token", expires_at=1.0,
                                   refresh_token="first-refresh"))

    output = await run_until_idle(config, data_dir, "refresh-secret", oauth2_dovecot)

    assert oauth2_dovecot.message_count(login) == 0
    assert [m.rcpt_tos for m in smtp_sink.messages] == [("alice@example.com",)]
    state = store.load("cloud")
    assert state.access_token not in ("", "expired-token")
    # This server does not rotate refresh tokens: the one stored is kept (rotation: the unit tests).
    assert state.refresh_token == "first-refresh"
    assert_no_token_anywhere(state, output, oauth2_dovecot.log_tail(400))
    assert "first-refresh" not in output


async def test_a_token_dovecot_refuses_is_renewed_once_and_the_mailbox_is_drained(
    authorization_server: AuthorizationServer, oauth2_dovecot: OAuth2Dovecot, smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    """A cached token that looks valid to popbridge but not to the server (revoked, or a clock far off)."""
    login = APP_CLIENTS[1]
    oauth2_dovecot.add_user(login, secrets.token_urlsafe(12))
    oauth2_dovecot.deliver(login, mail(4))
    table = (f'{{ token_url = "{authorization_server.token_url}", client_id = "{login}", '
             f'client_secret_env = "{SECRET_ENV}", grant = "client_credentials", scopes = ["pop"] }}')
    config = write_config(tmp_path / "popbridge.toml", oauth2_dovecot, smtp_sink, login, table)
    data_dir = tmp_path / "data"
    store = TokenStore(oauth2_directory(str(data_dir)))
    store.save("cloud", TokenState(access_token="not-a-token-the-server-issued", expires_at=4e9))

    output = await run_until_idle(config, data_dir, "app-secret", oauth2_dovecot)

    assert oauth2_dovecot.message_count(login) == 0
    assert store.load("cloud").access_token != "not-a-token-the-server-issued"
    assert "not-a-token-the-server-issued" not in output
