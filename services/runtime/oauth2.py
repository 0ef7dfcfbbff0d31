"""OAuth2 for XOAUTH2 logins, the decisions: provider endpoints, the cached token's state, when to renew,
and what a token endpoint's or a mail server's refusal means. No I/O here (oauth2_tokens.py does it).

Errors (all `CredentialError`, so a mailbox's pass fails alone and the others go on):

    CredentialError
    +-- OAuth2Error              a token could not be had; `retriable` says whether waiting helps
        +-- LoginRequiredError   the refresh token is missing, refused or revoked: a person must run
        |                        `popbridge oauth login NAME` (not retriable)
        +-- OAuth2RefusedError   the endpoint refused the client, the scopes or the request
        |                        (invalid_client, invalid_scope, ...): fix the app's registration
        +-- TokenEndpointDownError  no answer, a 5xx or a non-OAuth2 reply: retried with backoff (retriable)

Tokens never enter a message built here: the endpoint's own `error_description` is shown, cut short,
because providers put the reason a person needs there (AADSTS codes), never the token.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Literal

import msgspec

from services.runtime.secrets import CredentialError
from services.runtime.settings import OAuth2

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# An error_description longer than this is cut: it is shown in logs and `oauth status`.
MAX_DESCRIPTION = 300

_MICROSOFT = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
# Scopes from the providers' documentation (README "Cloud mailboxes" says which parts were tested here).
_SCOPES = {
    ("microsoft", "refresh_token"): ("https://outlook.office.com/POP.AccessAsUser.All",
                                     "https://outlook.office.com/SMTP.Send", "offline_access"),
    ("microsoft", "client_credentials"): ("https://outlook.office365.com/.default",),
    ("google", "refresh_token"): ("https://mail.google.com/",),
    ("google", "client_credentials"): ("https://mail.google.com/",),
}


@dataclass(frozen=True, kw_only=True)
class Endpoints:
    """Where one [oauth2] table gets its tokens, with which scopes."""

    token_url: str
    device_authorization_url: str | None
    scopes: tuple[str, ...]


def endpoints(oauth2: OAuth2) -> Endpoints:
    """The preset's endpoints and scopes, each overridden by what the table sets itself."""
    token_url, device_url = oauth2.token_url, oauth2.device_authorization_url
    if oauth2.provider == "microsoft":
        base = _MICROSOFT.format(tenant=oauth2.tenant)
        token_url, device_url = token_url or f"{base}/token", device_url or f"{base}/devicecode"
    elif oauth2.provider == "google":
        token_url = token_url or "https://oauth2.googleapis.com/token"
        device_url = device_url or "https://oauth2.googleapis.com/device/code"
    preset = _SCOPES.get((oauth2.provider or "", oauth2.grant), ())
    if token_url is None:  # pragma: no cover - OAuth2.__post_init__ rules it out
        raise ValueError("oauth2: no token_url")
    return Endpoints(token_url=token_url, device_authorization_url=device_url,
                     scopes=oauth2.scopes or preset)


class TokenState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What is kept on disk per mailbox (0600): the tokens and what `oauth status` shows. Times are Unix
    seconds of this machine's clock."""

    access_token: str = ""
    expires_at: float = 0.0
    refresh_token: str = ""
    last_refresh: float = 0.0
    last_error: str = ""
    last_error_at: float = 0.0
    login_required: bool = False


def needs_renewal(state: TokenState, now: float, margin: float) -> bool:
    """Renew when there is no access token or it expires within `margin` seconds."""
    return not state.access_token or state.expires_at - margin <= now


def usable(state: TokenState, now: float) -> bool:
    """The cached access token has not expired yet (what to use while the endpoint is down)."""
    return bool(state.access_token) and state.expires_at > now


def expiry(token: dict[str, object], now: float) -> float:
    """When a fresh token expires on our clock: `expires_in` is relative, so a skewed clock on either side
    does not matter (the JWT's `exp`, on the server's clock, is deliberately not read). A missing
    `expires_in` is taken as one hour, the usual lifetime; a server that disagrees refuses the login and
    the token is renewed once then."""
    seconds = token.get("expires_in")
    try:
        value = float(seconds) if isinstance(seconds, int | float | str) else 3600.0
    except ValueError:
        value = 3600.0
    return now + max(value, 0.0)


def renewed(state: TokenState, token: dict[str, object], now: float) -> TokenState:
    """The state after a successful token response; a rotated refresh token replaces the old one."""
    access = token.get("access_token")
    if not isinstance(access, str) or not access:
        raise TokenEndpointDownError("the token endpoint answered without an access_token")
    rotated = token.get("refresh_token")
    return TokenState(
        access_token=access, expires_at=expiry(token, now),
        refresh_token=rotated if isinstance(rotated, str) and rotated else state.refresh_token,
        last_refresh=now,
    )  # fmt: skip


def failed(state: TokenState, error: OAuth2Error, now: float) -> TokenState:
    """The state after a failed renewal: the tokens stay (a valid access token is still used), the error
    is recorded; a refused refresh token is dropped so it is never sent again."""
    login = isinstance(error, LoginRequiredError)
    return msgspec.structs.replace(
        state, last_error=str(error), last_error_at=now, login_required=login,
        refresh_token="" if login else state.refresh_token,
    )  # fmt: skip


# --- Errors ----------------------------------------------------------------------------------------


class OAuth2Error(CredentialError):
    """A token could not be had."""

    reason: str = "oauth2-error"  # the metric label

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code  # the endpoint's OAuth2 error code (RFC 6749 section 5.2), "" when there was none


class LoginRequiredError(OAuth2Error):
    retriable = False
    reason = "login-required"


class OAuth2RefusedError(OAuth2Error):
    retriable = False
    reason = "config-refused"


class TokenEndpointDownError(OAuth2Error):
    retriable = True
    reason = "endpoint-down"


def login_hint(name: str) -> str:
    return f"run `popbridge oauth login {name}`"


_CONFIG_ERRORS = {"invalid_client", "unauthorized_client", "invalid_scope", "unsupported_grant_type"}


def refusal(name: str, error: str, description: str | None, *, grant: str) -> OAuth2Error:
    """The error for a token endpoint's OAuth2 error reply (RFC 6749 section 5.2) to `grant`."""
    said = f"{error}: {_short(description)}" if description else error
    if error in ("invalid_grant", "expired_token") and grant in ("refresh_token", DEVICE_CODE_GRANT):
        hint = login_hint(name)
        message = f"{name}: the authorization server refused the grant ({said}); {hint}"
        return LoginRequiredError(message, code=error)
    if error in _CONFIG_ERRORS:
        return OAuth2RefusedError(f"{name}: the token endpoint refused the app registration ({said}); "
                                   "check client_id, the client secret and scopes", code=error)
    if error == "temporarily_unavailable":
        message = f"{name}: the token endpoint is temporarily unavailable ({said})"
        return TokenEndpointDownError(message, code=error)
    return OAuth2RefusedError(f"{name}: the token endpoint refused the request ({said})", code=error)


def _short(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_DESCRIPTION else line[: MAX_DESCRIPTION - 3] + "..."


# --- The mail server's side -----------------------------------------------------------------------

XoauthStatus = Literal["expired-or-invalid", "wrong-scope", "other"]


def xoauth2_error(said: str) -> tuple[XoauthStatus, str] | None:
    """What a server said after a refused XOAUTH2 token (JSON, or base64 of it), decoded: Google documents
    `{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}`, Dovecot sends the same shape
    (`"status":"invalid_token"` or `"insufficient_scope"`). None when `said` holds no such reply."""
    start, end = said.find("{"), said.rfind("}")
    text = said[start : end + 1] if 0 <= start < end else said.strip()
    try:
        document = json.loads(text if text.startswith("{") else base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error):
        return None
    if not isinstance(document, dict) or "status" not in document:
        return None
    status, scope = str(document.get("status")), document.get("scope")
    wanted = f", the server wants scope {scope!r}" if isinstance(scope, str) and scope else ""
    if status in ("insufficient_scope", "403"):
        return "wrong-scope", f"the token lacks a scope the server needs (status {status}{wanted})"
    if status in ("invalid_token", "401", "400"):
        return "expired-or-invalid", f"the server refused the token (status {status}{wanted})"
    return "other", f"the server refused the token (status {status}{wanted})"
