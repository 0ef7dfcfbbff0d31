"""How the fetcher logs in to a mailbox: its secret (password or OAuth2 token) and the configured method.

The secret is read for every session: a rotated password file or a refreshed token is picked up without a
restart. `token_command` is run (no shell) before each session and prints the token on stdout, so an
external refresher (e.g. an OAuth2 helper holding the refresh token) can supply it. No message built
here contains the secret or the command's output.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from services.fetcher.pop3 import Pop3Client
from services.runtime.secrets import read_secret
from services.runtime.settings import ConfigError, Mailbox

DEFAULT_COMMAND_TIMEOUT = 30.0


class CredentialError(Exception):
    """The password or token could not be obtained; retriable (a refresher may be down for a while)."""

    retriable = True


async def session_secret(mailbox: Mailbox, environ: Mapping[str, str]) -> str:
    """The password (auth user/apop/plain) or bearer token (xoauth2) for one session."""
    what = f"mailboxes[{mailbox.id}]"
    if mailbox.auth != "xoauth2":
        return read_secret(
            env=mailbox.password_env, file=mailbox.password_file, environ=environ, what=f"{what} password"
        )
    if mailbox.token_command:
        return await run_token_command(mailbox.token_command, what, timeout=mailbox.timeout)
    return read_secret(env=mailbox.token_env, file=mailbox.token_file, environ=environ, what=f"{what} token")


async def run_token_command(argv: tuple[str, ...], what: str, *, timeout: float) -> str:
    """Run `argv`; its stdout, stripped, is the token. CredentialError names the program, not its arguments
    or output."""
    shown = argv[0]  # its arguments may carry an account or a secret
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,  # a helper's diagnostics may quote secrets
        )
    except OSError as exc:
        raise CredentialError(f"{what} token_command `{shown}` cannot run: {exc.strerror}") from None
    try:
        async with asyncio.timeout(timeout):
            stdout, _ = await process.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise CredentialError(f"{what} token_command `{shown}` did not finish within {timeout:g} s") from None
    if process.returncode != 0:
        raise CredentialError(
            f"{what} token_command `{shown}` failed with exit status {process.returncode} (output not shown)"
        )
    token = stdout.decode("utf-8", "replace").strip()
    if not token or "\n" in token:
        raise CredentialError(f"{what} token_command `{shown}` did not print exactly one token line")
    return token


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
