"""TokenSource and the device login through authlib, with the token endpoint played by httpx2.MockTransport
(the failure modes a real server here cannot be made to show: revocation, rotation, outages, the device
grant), and the decisions of services.runtime.oauth2."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import parse_qs

import httpx2
import msgspec
import pytest

from services.runtime.metrics import Metrics
from services.runtime.oauth2 import (
    LoginRequiredError,
    OAuth2RefusedError,
    TokenEndpointDownError,
    TokenState,
    endpoints,
    xoauth2_error,
)
from services.runtime.oauth2_tokens import (
    MAX_REPLY_BYTES,
    AuthlibEndpoint,
    TokenSource,
    TokenStore,
    device_login,
)
from services.runtime.settings import OAuth2

TOKEN_URL = "https://login.example.test/token"
DEVICE_URL = "https://login.example.test/device"
SECRET_ENV = {"CLIENT_SECRET": "s3cret-client-value"}
Handler = Callable[[httpx2.Request], httpx2.Response]


def table(**overrides: object) -> OAuth2:
    fields: dict[str, object] = {"token_url": TOKEN_URL, "device_authorization_url": DEVICE_URL,
                                 "client_id": "app", "client_secret_env": "CLIENT_SECRET", "scopes": ("pop",)}
    return msgspec.convert(fields | overrides, OAuth2)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def form(request: httpx2.Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(request.content.decode()).items()}


def reply(status: int, document: object) -> httpx2.Response:
    return httpx2.Response(status, json=document)


def make_source(tmp_path: Path, handler: Handler, clock: Clock, *, metrics: Metrics | None = None,
                **overrides: object) -> TokenSource:
    endpoint = AuthlibEndpoint(httpx2.MockTransport(handler))
    return TokenSource("cloud", table(**overrides), store=TokenStore(tmp_path / "oauth2"), environ=SECRET_ENV,
                       endpoint=endpoint, clock=clock, sleep=clock.sleep, metrics=metrics)


async def test_a_cached_token_is_used_until_the_margin_then_renewed_and_a_rotated_refresh_token_kept(
    tmp_path: Path,
) -> None:
    clock, seen = Clock(), []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(form(request))
        return reply(200, {"access_token": f"at-{len(seen)}", "expires_in": 3600, "token_type": "Bearer",
                           "refresh_token": f"rt-{len(seen)}"})

    source = make_source(tmp_path, handler, clock)
    source.store.save("cloud", TokenState(refresh_token="rt-0"))
    assert await source.access_token() == "at-1"
    assert seen[0]["grant_type"] == "refresh_token"
    assert seen[0]["refresh_token"] == "rt-0"
    assert seen[0]["client_secret"] == "s3cret-client-value"
    clock.now += 3600 - 301
    assert await source.access_token() == "at-1"  # still outside the 300 s margin
    clock.now += 2
    assert await source.access_token() == "at-2"
    assert seen[1]["refresh_token"] == "rt-1"  # the rotated one was stored and used
    assert source.store.load("cloud").refresh_token == "rt-2"
    assert source.store.path("cloud").stat().st_mode & 0o777 == 0o600


async def test_a_revoked_refresh_token_stops_the_login_with_the_command_to_run_and_raises_the_metric(
    tmp_path: Path,
) -> None:
    clock, metrics = Clock(), Metrics(process=False)
    source = make_source(tmp_path, lambda _: reply(400, {"error": "invalid_grant", "error_description":
                                                           "AADSTS50173: the grant was revoked"}),
                         clock, metrics=metrics)
    source.store.save("cloud", TokenState(refresh_token="rt-revoked", access_token="at-old-value",
                                          expires_at=1.0))
    with pytest.raises(LoginRequiredError, match=r"AADSTS50173.*run `popbridge oauth login cloud`") as caught:
        await source.access_token()
    assert not caught.value.retriable
    state = source.store.load("cloud")
    assert state.login_required
    assert state.refresh_token == ""  # never sent again
    assert "rt-revoked" not in str(caught.value)
    text = metrics.render().decode()
    assert 'popbridge_oauth2_login_required{mailbox="cloud"} 1.0' in text
    assert 'popbridge_oauth2_token_failures_total{mailbox="cloud",reason="login-required"} 1.0' in text
    assert "rt-revoked" not in text
    assert "at-old-value" not in text
    with pytest.raises(LoginRequiredError, match="no refresh token is stored"):
        await source.access_token()


async def test_while_the_endpoint_is_down_it_retries_with_backoff_and_keeps_using_a_valid_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock, calls = Clock(), []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(request)
        return httpx2.Response(503, text="<html>maintenance</html>")

    source = make_source(tmp_path, handler, clock)
    source.store.save("cloud", TokenState(access_token="still-valid", expires_at=clock.now + 120,
                                          refresh_token="rt"))
    with caplog.at_level(logging.INFO):
        assert await source.access_token() == "still-valid"
    assert clock.slept == [1.0, 4.0, 15.0]
    assert len(calls) == 4
    assert "HTTP 503" in source.store.load("cloud").last_error
    clock.now += 200  # now it has expired too
    with pytest.raises(TokenEndpointDownError) as caught:
        await source.access_token()
    assert caught.value.retriable
    assert "still-valid" not in caplog.text
    assert "rt" not in source.store.load("cloud").last_error.split()


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "streamed"])
async def test_an_endpoint_that_answers_without_end_is_cut_off_and_treated_as_down(
    tmp_path: Path, declared: bool
) -> None:
    clock, sent = Clock(), []

    async def endless() -> AsyncIterator[bytes]:
        for _ in range(10_000):  # 640 MB if nobody stops reading
            sent.append(1)
            yield b'{"access_token": "' + b"x" * 65_536

    def handler(request: httpx2.Request) -> httpx2.Response:
        headers = {"content-length": str(640 * 2**20)} if declared else {}
        return httpx2.Response(200, headers=headers, content=endless())

    source = make_source(tmp_path, handler, clock)
    source.store.save("cloud", TokenState(access_token="old", expires_at=clock.now - 1, refresh_token="rt"))
    with pytest.raises(TokenEndpointDownError, match=f"the reply is over {MAX_REPLY_BYTES} bytes"):
        await source.access_token()
    assert clock.slept == [1.0, 4.0, 15.0]  # retried like any failing endpoint
    assert len(sent) <= 4 * (MAX_REPLY_BYTES // 65_536 + 1)


async def test_a_token_the_server_refused_is_renewed_even_though_our_clock_says_it_is_valid(
    tmp_path: Path,
) -> None:
    """Clock skew (or a revoked access token): the refusal, not our clock, decides."""
    clock = Clock()
    source = make_source(tmp_path, lambda _: reply(200, {"access_token": "fresh", "expires_in": 600}),
                         clock, grant="client_credentials")
    source.store.save("cloud", TokenState(access_token="refused", expires_at=clock.now + 3000))
    assert await source.access_token() == "refused"
    assert await source.access_token(refused=True) == "fresh"
    assert source.store.load("cloud").expires_at == clock.now + 600  # from expires_in, not the JWT's exp


async def test_wrong_scopes_at_the_endpoint_name_the_registration_to_fix(tmp_path: Path) -> None:
    source = make_source(tmp_path, lambda _: reply(400, {"error": "invalid_scope"}), Clock(),
                         grant="client_credentials")
    with pytest.raises(OAuth2RefusedError, match=r"invalid_scope.*check client_id, the client secret"):
        await source.access_token()


@pytest.mark.parametrize(
    ("said", "kind", "words"),
    [
        ('pop3 AUTH refused: -ERR [AUTH] (server challenge: {"status":"401","schemes":"bearer",'
         '"scope":"https://mail.google.com/"})', "expired-or-invalid", "wants scope 'https://mail.google.com/'"),
        ("eyJzdGF0dXMiOiJpbnN1ZmZpY2llbnRfc2NvcGUiLCJzY29wZSI6InBvcCJ9", "wrong-scope", "lacks a scope"),
        ("-ERR [AUTH] Authentication failed.", None, None),
    ],
)
def test_the_servers_xoauth2_json_error_is_decoded(said: str, kind: str | None, words: str | None) -> None:
    found = xoauth2_error(said)
    if kind is None:
        assert found is None
    else:
        assert found is not None
        assert found[0] == kind
        assert words is not None
        assert words in found[1]


async def test_device_login_shows_the_code_waits_for_the_person_and_stores_the_refresh_token(
    tmp_path: Path,
) -> None:
    clock, polls, shown = Clock(), [], list[str]()

    def handler(request: httpx2.Request) -> httpx2.Response:
        if str(request.url) == DEVICE_URL:
            assert form(request)["scope"] == "pop"
            return reply(200, {"device_code": "dc", "user_code": "ABCD-EFGH", "interval": 5,
                               "verification_uri": "https://login.example.test/activate",
                               "expires_in": 900})
        polls.append(form(request))
        if len(polls) == 1:
            return reply(400, {"error": "authorization_pending"})
        if len(polls) == 2:
            return reply(400, {"error": "slow_down"})
        return reply(200, {"access_token": "at", "refresh_token": "rt-device", "expires_in": 3600})

    source = make_source(tmp_path, handler, clock)
    state = await device_login(source, shown.append)
    assert shown == [
        "To sign in cloud, open https://login.example.test/activate and enter the code ABCD-EFGH"
    ]
    assert [p["grant_type"] for p in polls] == ["urn:ietf:params:oauth:grant-type:device_code"] * 3
    assert clock.slept == [5.0, 5.0, 10.0]  # slow_down adds 5 s to the interval (RFC 8628 section 3.5)
    assert state.refresh_token == "rt-device"
    assert source.store.load("cloud").refresh_token == "rt-device"


async def test_device_login_that_expires_says_to_run_it_again(tmp_path: Path) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        if str(request.url) == DEVICE_URL:
            return reply(200, {"device_code": "dc", "user_code": "X", "verification_uri": "https://v"})
        return reply(400, {"error": "expired_token"})

    with pytest.raises(LoginRequiredError, match="popbridge oauth login cloud"):
        await device_login(make_source(tmp_path, handler, Clock()), lambda _: None)


def test_presets_give_the_providers_documented_endpoints_and_scopes() -> None:
    microsoft = endpoints(msgspec.convert({"provider": "microsoft", "client_id": "c", "tenant": "contoso.com",
                                           "grant": "client_credentials", "client_secret_env": "S"}, OAuth2))
    assert microsoft.token_url == "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token"
    assert microsoft.scopes == ("https://outlook.office365.com/.default",)
    google = endpoints(msgspec.convert({"provider": "google", "client_id": "c"}, OAuth2))
    assert google.token_url == "https://oauth2.googleapis.com/token"
    assert google.scopes == ("https://mail.google.com/",)


def test_a_damaged_token_file_is_an_error_naming_the_file_not_its_content(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    store.path("cloud").write_text(json.dumps({"access_token": 5}))
    with pytest.raises(Exception, match=r"cloud\.json is damaged; run `popbridge oauth login cloud`"):
        store.load("cloud")
