"""Cloud mailboxes end to end: `popbridge run` gets its own tokens from a real authorization server
(mock-oauth2-server) and drains a Dovecot that checks every XOAUTH2 token by introspection at that server.

A mailbox is configured with nothing but an [oauth2] table. The tokens never appear in the output, the
log, the events or the metrics' text.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
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
from tests.support.oauth2_server import CLIENTS, MAVEN_CACHE, AuthorizationServer, OAuth2Dovecot
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
{mailbox(dovecot, "cloud", login, "alice@example.com", oauth2)}""")
    return path


def mailbox(dovecot: OAuth2Dovecot, name: str, login: str, recipient: str, oauth2: str) -> str:
    """One [[mailboxes]] entry on the test Dovecot, configured with nothing but its [oauth2] table."""
    return f"""
[[mailboxes]]
id = "{name}"
host = "{dovecot.host}"
port = {dovecot.pop3_port}
tls = "none"
username = "{login}"
recipients = ["{recipient}"]
oauth2 = {oauth2}
"""


async def popbridge(config: Path, data_dir: Path, secret: str, *args: str) -> tuple[int, str]:
    """Run `popbridge ARGS --config CONFIG`; its exit code and whole output (JSON log lines, then text)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POPBRIDGE_")}
    env |= {"POPBRIDGE_DATA_DIR": str(data_dir), SECRET_ENV: secret, "POPBRIDGE_LOG_LEVEL": "DEBUG"}
    process = await asyncio.create_subprocess_exec(
        POPBRIDGE, *args, "--config", str(config), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def run_until_idle(config: Path, data_dir: Path, secret: str, dovecot: OAuth2Dovecot) -> str:
    """`popbridge run --until-idle`, which must succeed; its whole output."""
    code, output = await popbridge(config, data_dir, secret, "run", "--until-idle")
    assert code == 0, output[-2000:] + dovecot.log_tail(30)
    return output


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
    login = CLIENTS[0]  # its tokens carry sub = client_id
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
    login = CLIENTS[2]
    oauth2_dovecot.add_user(login, "unused-password")
    oauth2_dovecot.deliver(login, mail(3))
    table = (f'{{ token_url = "{authorization_server.token_url}", client_id = "{login}", '
             f'client_secret_env = "{SECRET_ENV}", scopes = ["pop", "offline_access"] }}')
    config = write_config(tmp_path / "popbridge.toml", oauth2_dovecot, smtp_sink, login, table)
    data_dir = tmp_path / "data"
    store = TokenStore(oauth2_directory(str(data_dir)))
    # What a sign-in leaves behind, an hour later: an expired access token and a refresh token the server
    # issued (this server has no device grant: its authorization code grant issues it).
    refresh = authorization_server.refresh_token_for(login, "refresh-secret")
    store.save("cloud", TokenState(access_token="expired-token", expires_at=1.0, refresh_token=refresh))

    output = await run_until_idle(config, data_dir, "refresh-secret", oauth2_dovecot)

    assert oauth2_dovecot.message_count(login) == 0
    assert [m.rcpt_tos for m in smtp_sink.messages] == [("alice@example.com",)]
    state = store.load("cloud")
    assert state.access_token not in ("", "expired-token")
    assert state.refresh_token == refresh  # this server does not rotate (rotation: the unit tests)
    assert_no_token_anywhere(state, output, oauth2_dovecot.log_tail(400))


async def test_a_revoked_refresh_token_stops_its_mailbox_with_the_login_command_and_the_others_go_on(
    authorization_server: AuthorizationServer, oauth2_dovecot: OAuth2Dovecot, smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    revoked_login, other_login = CLIENTS[3], CLIENTS[4]
    oauth2_dovecot.add_user(revoked_login, "unused-password")
    oauth2_dovecot.add_user(other_login, secrets.token_urlsafe(12))
    oauth2_dovecot.deliver(revoked_login, mail(5))
    oauth2_dovecot.deliver(other_login, mail(6))
    delegated = (f'{{ token_url = "{authorization_server.token_url}", client_id = "{revoked_login}", '
                 f'client_secret_env = "{SECRET_ENV}" }}')
    config = write_config(tmp_path / "popbridge.toml", oauth2_dovecot, smtp_sink, revoked_login, delegated)
    app_only = (f'{{ token_url = "{authorization_server.token_url}", client_id = "{other_login}", '
                f'client_secret_env = "{SECRET_ENV}", grant = "client_credentials" }}')
    with config.open("a") as file:
        file.write(mailbox(oauth2_dovecot, "other", other_login, "bob@example.com", app_only))
    data_dir = tmp_path / "data"
    store = TokenStore(oauth2_directory(str(data_dir)))
    refresh = authorization_server.refresh_token_for(revoked_login, "the-secret")
    store.save("cloud", TokenState(access_token="expired-token", expires_at=1.0, refresh_token=refresh))
    authorization_server.revoke(refresh, revoked_login, "the-secret")

    code, output = await popbridge(config, data_dir, "the-secret", "run", "--until-idle")

    assert code == 1  # a mailbox failed
    assert "run `popbridge oauth login cloud`" in output
    assert "invalid_grant" in output
    assert oauth2_dovecot.message_count(revoked_login) == 1  # left on the server
    assert oauth2_dovecot.message_count(other_login) == 0  # the other mailbox went on
    assert [m.rcpt_tos for m in smtp_sink.messages] == [("bob@example.com",)]
    assert store.load("cloud").refresh_token == ""  # the refused token is never sent again
    code, status = await popbridge(config, data_dir, "the-secret", "oauth", "status")
    assert code == 1
    assert status.splitlines()[0].startswith("cloud: login-required (refresh_token)")
    assert "run `popbridge oauth login cloud`" in status
    assert refresh not in output + status


async def test_a_token_dovecot_refuses_is_renewed_once_and_the_mailbox_is_drained(
    authorization_server: AuthorizationServer, oauth2_dovecot: OAuth2Dovecot, smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    """A cached token that looks valid to popbridge but not to the server (revoked, or a clock far off)."""
    login = CLIENTS[1]
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


async def test_the_deliverers_smtp_login_gets_its_own_token_and_dovecot_submission_checks_it(
    authorization_server: AuthorizationServer, oauth2_dovecot: OAuth2Dovecot, tmp_path: Path,
) -> None:
    """Both ends through Dovecot's XOAUTH2 check: POP3 in, and SMTP submission out (which relays to a sink),
    each with nothing but an [oauth2] table. The deliverer's cached token is one the server never issued:
    refused, it is renewed once and the copy goes out."""
    login = CLIENTS[5]
    oauth2_dovecot.add_user(login, secrets.token_urlsafe(12))
    oauth2_dovecot.deliver(login, mail(7))
    table = (f'{{ token_url = "{authorization_server.token_url}", client_id = "{login}", '
             f'client_secret_env = "{SECRET_ENV}", grant = "client_credentials" }}')
    config = write_config(tmp_path / "popbridge.toml", oauth2_dovecot, oauth2_dovecot.relay, login, table)
    text = config.read_text().replace(
        f'host = "{oauth2_dovecot.relay.host}"\nport = {oauth2_dovecot.relay.port}\ntls = "none"\n',
        f'host = "{oauth2_dovecot.host}"\nport = {oauth2_dovecot.submission_port}\ntls = "none"\n'
        f'username = "{login}"\noauth2 = {table}\n', 1)
    assert f"port = {oauth2_dovecot.submission_port}" in text
    config.write_text(text)
    data_dir = tmp_path / "data"
    store = TokenStore(oauth2_directory(str(data_dir)))
    store.save("delivery", TokenState(access_token="never-issued", expires_at=4e9))

    output = await run_until_idle(config, data_dir, "app-secret", oauth2_dovecot)

    assert oauth2_dovecot.message_count(login) == 0
    [relayed] = [m for m in oauth2_dovecot.relay.messages if b"Subject: cloud 7" in m.content]
    assert relayed.rcpt_tos == ("alice@example.com",)
    assert store.load("delivery").access_token not in ("", "never-issued")  # cached apart from the mailbox's
    assert f"submission-login: Info: Login: user=<{login}>, method=XOAUTH2" in oauth2_dovecot.log_tail(400)
    assert_no_token_anywhere(store.load("delivery"), output, oauth2_dovecot.log_tail(400))


def test_the_authorization_server_picks_another_port_when_its_first_is_taken_before_it_binds(
    authorization_server: AuthorizationServer, tmp_path: Path
) -> None:
    """The port is picked free and bound by the JVM seconds later: one taken in between costs a new pick."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks: list[int] = []

        class TakenFirst(AuthorizationServer):
            def _pick_port(self) -> int:
                picks.append(busy if not picks else super()._pick_port())
                return picks[-1]

        with TakenFirst(tmp_path, MAVEN_CACHE) as server:
            assert server.port == picks[-1]
            assert server.refresh_token_for(CLIENTS[0], "secret")
    assert len(picks) == 2
    assert picks[1] != busy
    assert "Address already in use" in (tmp_path / "server.log").read_text(errors="replace")
