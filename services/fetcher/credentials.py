"""How the fetcher logs in to a mailbox: its secret (password or OAuth2 token) and the configured method.

The secret is read for every session: a rotated password file or a refreshed token is picked up without a
restart. `token_command` is run (no shell) before each session and prints the token on stdout, so an
external refresher (e.g. an OAuth2 helper holding the refresh token) can supply it. No message built
here contains the secret or the command's output.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.fetcher.pop3 import Pop3Client
from services.runtime.secrets import read_secret, read_token
from services.runtime.settings import ConfigError, Mailbox


async def session_secret(mailbox: Mailbox, environ: Mapping[str, str]) -> str:
    """The password (auth user/apop/plain) or bearer token (xoauth2) for one session."""
    what = f"mailboxes[{mailbox.id}]"
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
