"""How the fetcher logs in to a mailbox: its secret (password or OAuth2 token) and the configured method.

The secret is read for every session: a rotated password file or a refreshed token is picked up without a
restart. `token_command` is run (no shell) before each session and prints the token on stdout, so an
external refresher (e.g. an OAuth2 helper holding the refresh token) can supply it. With an [oauth2]
table popbridge gets the token itself (services.runtime.oauth2_tokens) and, when the server refuses it,
renews it once and tries again in the same session. No message built here contains the secret or the
command's output.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.fetcher.pop3 import Pop3AuthError, Pop3Client
from services.runtime.oauth2 import xoauth2_error
from services.runtime.oauth2_tokens import TokenSources
from services.runtime.secrets import read_secret, read_token
from services.runtime.settings import ConfigError, Mailbox


async def session_secret(
    mailbox: Mailbox, environ: Mapping[str, str], tokens: TokenSources | None = None
) -> str:
    """The password (auth user/apop/plain) or bearer token (xoauth2) for one session."""
    what = f"mailboxes[{mailbox.id}]"
    if mailbox.oauth2 is not None and tokens is not None:
        return await tokens.source(mailbox.id, mailbox.oauth2).access_token()
    if mailbox.auth != "xoauth2":
        return read_secret(
            env=mailbox.password_env, file=mailbox.password_file, environ=environ, what=f"{what} password"
        )
    return await read_token(env=mailbox.token_env, file=mailbox.token_file, command=mailbox.token_command,
                            environ=environ, what=what, timeout=mailbox.timeout)


async def authenticate(client: Pop3Client, mailbox: Mailbox, secret: str) -> None:
    """Log in with the mailbox's configured method (`auth`)."""
    if mailbox.auth == "user":
        await client.login(mailbox.username, secret)
    elif mailbox.auth == "apop":
        await client.apop(mailbox.username, secret)
    elif mailbox.auth == "plain":
        await client.auth_plain(mailbox.username, secret)
    elif mailbox.auth == "xoauth2":
        await client.auth_xoauth2(mailbox.username, secret)
    else:  # pragma: no cover - the config's Literal type rules it out
        raise ConfigError(f"mailboxes[{mailbox.id}].auth: unknown method {mailbox.auth!r}")


async def login(
    client: Pop3Client, mailbox: Mailbox, secret: str, tokens: TokenSources | None = None
) -> None:
    """`authenticate`; a refused popbridge-held token (revoked, or expired early by a skewed clock) is
    renewed once and sent again. A second refusal names what the server said (its XOAUTH2 JSON status)."""
    try:
        await authenticate(client, mailbox, secret)
    except Pop3AuthError as exc:
        if mailbox.oauth2 is None or tokens is None:
            raise
        first = xoauth2_error(str(exc))
        if first is not None and first[0] == "wrong-scope":
            raise Pop3AuthError(f"{exc}: {first[1]}; check oauth2.scopes and the app's permissions") from None
        fresh = await tokens.source(mailbox.id, mailbox.oauth2).access_token(refused=True)
        try:
            await authenticate(client, mailbox, fresh)
        except Pop3AuthError as again:
            found = xoauth2_error(str(again))
            raise Pop3AuthError(f"{again}: {found[1]}" if found else str(again)) from None
