"""OAuth2 for XOAUTH2 logins, the I/O: the token cache on disk, the token endpoint (authlib over httpx),
and `TokenSource`, which hands out a valid access token per mailbox (decisions in services.runtime.oauth2).

Why authlib: one well-kept client for every provider and grant (refresh_token, client_credentials, the
device code grant), with an injectable httpx transport; msal would cover Microsoft only, and its token
cache would be a second place where refresh tokens live.

The cache is one JSON file per mailbox under `<data_dir>/oauth2/`, mode 0600, replaced atomically (a
crash leaves the old file or the new one, never half of a rotated refresh token). Tokens appear in no
message, log line, metric or exception raised here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx2 as httpx  # httpx2: the httpx line authlib now builds on (plain httpx is deprecated there)
import msgspec
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client

from services.runtime.metrics import Metrics
from services.runtime.oauth2 import (
    DEVICE_CODE_GRANT,
    LoginRequiredError,
    OAuth2Error,
    TokenEndpointDownError,
    TokenState,
    endpoints,
    failed,
    login_hint,
    needs_renewal,
    refusal,
    renewed,
    usable,
)
from services.runtime.secrets import read_secret
from services.runtime.settings import OAuth2

log = logging.getLogger(__name__)

# Retries of one renewal while the endpoint is down: waits between attempts (seconds); bounded, so a pass
# waits at most their sum before it uses a still-valid token or fails (the next poll tries again).
BACKOFF = (1.0, 4.0, 15.0)
MAX_STATE_BYTES = 64 * 1024  # a token file larger than this is not ours
# A token or device-authorization reply is a few KB (Microsoft's with an id_token ~8 KB); an endpoint that
# sends more is broken or hostile and must not cost the process its memory.
MAX_REPLY_BYTES = 256 * 1024
DELIVERY = "delivery"  # the name of the deliverer's SMTP login in the cache, status and metrics
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def oauth2_directory(data_dir: str) -> Path:
    """Where the token files live: `<data_dir>/oauth2` (POPBRIDGE_DATA_DIR, or the embedded log's default)."""
    from services.runtime.connect import DEFAULT_DATA_DIR  # noqa: PLC0415  # keeps Kafka out of the CLI's import

    return (Path(data_dir) if data_dir else DEFAULT_DATA_DIR).expanduser() / "oauth2"


class TokenStore:
    """One file per name: `<directory>/<name>.json`, 0600, in a 0700 directory, replaced atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        return self.directory / f"{_SAFE_NAME.sub('_', name)}.json"

    def load(self, name: str) -> TokenState:
        path = self.path(name)
        try:
            with path.open("rb") as file:
                data = file.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return TokenState()
        except OSError as exc:
            raise OAuth2Error(f"{name}: cannot read the token file {path}: {exc.strerror}") from None
        damaged = OAuth2Error(f"{name}: the token file {path} is damaged; {login_hint(name)}")
        if len(data) > MAX_STATE_BYTES:
            raise damaged
        try:
            return msgspec.json.decode(data, type=TokenState)
        except msgspec.DecodeError:
            raise damaged from None

    def save(self, name: str, state: TokenState) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.path(name)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.new")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(descriptor, msgspec.json.encode(state))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)


# --- The token endpoint ---------------------------------------------------------------------------


class TokenEndpoint(Protocol):
    """Requests to an authorization server. Raises OAuth2Error subclasses only (refusal() for OAuth2 error
    replies, TokenEndpointDownError for everything else); never returns or raises a token in a message."""

    async def token(self, oauth2: OAuth2, secret: str | None, name: str, **params: str) -> dict[str, Any]: ...

    async def device_authorization(self, oauth2: OAuth2, secret: str | None, name: str) -> dict[str, Any]: ...


class ReplyTooLargeError(httpx.TransportError):
    """The endpoint sent more than MAX_REPLY_BYTES."""


class _BoundedBody(httpx.AsyncByteStream):
    def __init__(self, body: httpx.AsyncByteStream, request: httpx.Request, limit: int) -> None:
        self._body, self._request, self._limit = body, request, limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._body:
            seen += len(chunk)
            if seen > self._limit:
                raise ReplyTooLargeError(f"the reply is over {self._limit} bytes", request=self._request)
            yield chunk

    async def aclose(self) -> None:
        await self._body.aclose()


class BoundedTransport(httpx.AsyncBaseTransport):
    """Any transport, with the reply body cut off at `limit` bytes: httpx has no size limit of its own, and
    authlib reads the whole reply into memory before it looks at it."""

    def __init__(self, inner: httpx.AsyncBaseTransport, limit: int = MAX_REPLY_BYTES) -> None:
        self._inner, self._limit = inner, limit

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._limit:
            await response.aclose()
            raise ReplyTooLargeError(f"the reply is over {self._limit} bytes", request=request)
        body = response.stream
        assert isinstance(body, httpx.AsyncByteStream)  # an async transport streams asynchronously
        return httpx.Response(response.status_code, headers=response.headers, extensions=response.extensions,
                              stream=_BoundedBody(body, request, self._limit), request=request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class AuthlibEndpoint:
    """The token endpoint through authlib's httpx client; `transport` is for tests (httpx.MockTransport)."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._transport = transport

    def _bounded(self) -> BoundedTransport:
        return BoundedTransport(self._transport or httpx.AsyncHTTPTransport())  # one per client: it closes it

    def _client(self, oauth2: OAuth2, secret: str | None) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=oauth2.client_id, client_secret=secret, scope=" ".join(endpoints(oauth2).scopes),
            token_endpoint_auth_method="client_secret_post" if secret else "none",
            timeout=oauth2.timeout, transport=self._bounded(), follow_redirects=False,
        )  # fmt: skip

    async def token(self, oauth2: OAuth2, secret: str | None, name: str, **params: str) -> dict[str, Any]:
        url, grant = endpoints(oauth2).token_url, params.pop("grant_type")
        try:
            async with self._client(oauth2, secret) as client:
                if grant == "refresh_token":
                    token = await client.refresh_token(url, refresh_token=params["refresh_token"])
                else:
                    token = await client.fetch_token(url, grant_type=grant, **params)
        except OAuthError as exc:
            raise refusal(name, exc.error or "error", exc.description, grant=grant) from None
        except (httpx.HTTPError, ValueError) as exc:
            message = f"{name}: the token endpoint {url} failed: {_describe(exc)}"
            raise TokenEndpointDownError(message) from None
        return dict(token)

    async def device_authorization(self, oauth2: OAuth2, secret: str | None, name: str) -> dict[str, Any]:
        found = endpoints(oauth2)
        if not found.device_authorization_url:
            raise OAuth2Error(f"{name}: set oauth2.device_authorization_url (the provider has no preset)")
        data = {"client_id": oauth2.client_id, "scope": " ".join(found.scopes)}
        if secret:
            data["client_secret"] = secret
        try:
            async with httpx.AsyncClient(timeout=oauth2.timeout, transport=self._bounded()) as client:
                response = await client.post(found.device_authorization_url, data=data)
            document = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            url = found.device_authorization_url
            raise TokenEndpointDownError(f"{name}: the device authorization endpoint {url} failed: "
                                    f"{_describe(exc)}") from None
        if not isinstance(document, dict) or "error" in document or "device_code" not in document:
            said = document if isinstance(document, dict) else {}
            raise refusal(name, str(said.get("error", "invalid_response")), said.get("error_description"),
                          grant=DEVICE_CODE_GRANT)
        return document


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, ValueError):
        return "the reply is not an OAuth2 JSON document"
    if isinstance(exc, ReplyTooLargeError):
        return str(exc)
    return type(exc).__name__


# --- The token source -----------------------------------------------------------------------------


Sleep = Callable[[float], Awaitable[None]]


class TokenSource:
    """The access token of one login (a mailbox, or the deliverer's SMTP login as `delivery`)."""

    def __init__(self, name: str, oauth2: OAuth2, *, store: TokenStore, environ: Mapping[str, str],
                 endpoint: TokenEndpoint | None = None, clock: Callable[[], float] = time.time,
                 sleep: Sleep = asyncio.sleep, metrics: Metrics | None = None, what: str = "") -> None:
        self.name, self.oauth2, self.store = name, oauth2, store
        self.endpoint, self.clock, self.sleep = endpoint or AuthlibEndpoint(), clock, sleep
        self._environ, self._metrics = environ, metrics
        self._what = what or f"mailboxes[{name}]"
        self._lock = asyncio.Lock()

    def client_secret(self) -> str | None:
        oauth2 = self.oauth2
        if not (oauth2.client_secret_env or oauth2.client_secret_file):
            return None  # a public client (device login without a secret)
        return read_secret(env=oauth2.client_secret_env, file=oauth2.client_secret_file,
                           environ=self._environ, what=f"{self._what}.oauth2 client secret")

    async def access_token(self, *, refused: bool = False) -> str:
        """A valid access token, renewed when it expires within `refresh_margin`; `refused`: the server
        just refused the cached one (revoked, or a clock skew beyond the margin), so renew it regardless."""
        async with self._lock:
            state, now = self.store.load(self.name), self.clock()
            if not refused and not needs_renewal(state, now, self.oauth2.refresh_margin):
                return state.access_token
            try:
                token = await self._renew(state)
            except OAuth2Error as exc:
                self.store.save(self.name, failed(state, exc, now))
                self._count_failure(exc)
                if isinstance(exc, TokenEndpointDownError) and not refused and usable(state, now):
                    log.warning("%s; using the cached access token until it expires", exc)
                    return state.access_token
                raise
            fresh = renewed(state, token, self.clock())
            self.store.save(self.name, fresh)
            self._count_renewal()
            return fresh.access_token

    async def __call__(self) -> str:
        """The token source interface of the deliverer (services.deliverer.smtp.RenewableToken)."""
        return await self.access_token()

    async def renew(self) -> str:
        """A new token in place of one the server refused."""
        return await self.access_token(refused=True)

    async def _renew(self, state: TokenState) -> dict[str, Any]:
        secret = self.client_secret()
        if self.oauth2.grant == "client_credentials":
            params = {"grant_type": "client_credentials"}
        elif state.refresh_token:
            params = {"grant_type": "refresh_token", "refresh_token": state.refresh_token}
        else:
            raise LoginRequiredError(f"{self.name}: no refresh token is stored; {login_hint(self.name)}")
        for wait in (*BACKOFF, None):
            try:
                return await self.endpoint.token(self.oauth2, secret, self.name, **params)
            except TokenEndpointDownError as exc:
                if wait is None:
                    raise
                log.info("%s; retrying in %g s", exc, wait)
                await self.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _count_failure(self, error: OAuth2Error) -> None:
        if self._metrics is not None:
            self._metrics.oauth2_token_failures.labels(self.name, error.reason).inc()
            login = isinstance(error, LoginRequiredError)
            self._metrics.oauth2_login_required.labels(self.name).set(int(login))

    def _count_renewal(self) -> None:
        if self._metrics is not None:
            self._metrics.oauth2_token_renewals.labels(self.name).inc()
            self._metrics.oauth2_login_required.labels(self.name).set(0)


class TokenSources:
    """One TokenSource per login name, built on first use (the fetcher's and the deliverer's registry)."""

    def __init__(self, directory: Path, environ: Mapping[str, str], *, metrics: Metrics | None = None,
                 endpoint: TokenEndpoint | None = None, clock: Callable[[], float] = time.time,
                 sleep: Sleep = asyncio.sleep) -> None:
        self.store = TokenStore(directory)
        self._environ, self._metrics, self._endpoint = environ, metrics, endpoint
        self._clock, self._sleep = clock, sleep
        self._sources: dict[str, TokenSource] = {}

    def source(self, name: str, oauth2: OAuth2, *, what: str = "") -> TokenSource:
        found = self._sources.get(name)
        if found is None or found.oauth2 != oauth2:
            found = TokenSource(
                name, oauth2, store=self.store, environ=self._environ, endpoint=self._endpoint,
                clock=self._clock, sleep=self._sleep, metrics=self._metrics, what=what,
            )  # fmt: skip
            self._sources[name] = found
        return found


async def device_login(source: TokenSource, show: Callable[[str], None], *,
                       max_wait: float = 900.0) -> TokenState:
    """The device authorization grant (RFC 8628): ask for a code, `show` the person where to enter it,
    poll the token endpoint at the interval the server asks for until they have, store the tokens."""
    endpoint, secret, name = source.endpoint, source.client_secret(), source.name
    grant = await endpoint.device_authorization(source.oauth2, secret, name)
    # verification_url: Google's name for RFC 8628's verification_uri
    url = next((grant[key] for key in ("verification_uri_complete", "verification_uri", "verification_url")
                if grant.get(key)), None)
    show(f"To sign in {name}, open {url} and enter the code {grant.get('user_code')}")
    interval = float(grant.get("interval") or 5)
    deadline = source.clock() + min(float(grant.get("expires_in") or max_wait), max_wait)
    while True:
        await source.sleep(interval)
        try:
            token = await endpoint.token(source.oauth2, secret, name, grant_type=DEVICE_CODE_GRANT,
                                         device_code=str(grant["device_code"]))
        except OAuth2Error as exc:
            pending = _device_pending(exc)
            if pending is None or source.clock() > deadline:
                raise
            interval += pending
            continue
        state = renewed(source.store.load(name), token, source.clock())
        state = msgspec.structs.replace(state, login_required=False, last_error="", last_error_at=0.0)
        source.store.save(name, state)
        return state


def _device_pending(error: OAuth2Error) -> float | None:
    """Seconds to add to the polling interval while the person has not finished (RFC 8628 section 3.5):
    0 for authorization_pending, 5 for slow_down; None for a real failure."""
    return {"authorization_pending": 0.0, "slow_down": 5.0}.get(error.code)

