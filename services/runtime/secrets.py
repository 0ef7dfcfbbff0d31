"""Reading referenced secrets: a password or a bearer token from an environment variable, a file or a command.

Values never enter a message or a log line. Errors:

    ConfigError        the reference itself is unusable (variable unset, file unreadable): fix the config
    CredentialError    a token command failed or hung: retriable (a refresher may be down for a while)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from services.runtime.settings import ConfigError

REDACTED = "<redacted>"
# A base64 core shorter than this would blank ordinary text by chance; the plain secret is blanked anyway.
_MIN_BASE64_CORE = 6


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret blanked out: as written, and as base64 wherever a server may echo it.

    A secret inside a longer base64 blob (SASL PLAIN's `\\0user\\0password`, XOAUTH2's `auth=Bearer
    token`) is encoded differently depending on its offset modulo 3, so each of the three alignments is
    blanked: the run of base64 characters that depends on the secret's bytes only.
    """
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        for form in (secret, *_base64_forms(secret)):
            text = text.replace(form, REDACTED)
    return text


def _base64_forms(secret: str) -> list[str]:
    raw = secret.encode("utf-8", "surrogateescape")
    forms = []
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw + b"\0\0").decode("ascii")
        start = -(-shift * 4 // 3)  # the first character no padding byte before the secret touches
        end = (shift + len(raw)) * 4 // 3  # the last one no byte after it touches
        if end - start >= _MIN_BASE64_CORE:
            forms.append(encoded[start:end])
    forms.append(base64.b64encode(raw).decode("ascii"))  # the secret alone, padding included
    return forms


class CredentialError(Exception):
    """The password or token could not be obtained; retriable (a refresher may be down for a while)."""

    retriable = True


def read_secret(*, env: str | None, file: str | None, environ: Mapping[str, str], what: str) -> str:
    """The secret named by `env` or `file`; ConfigError names the reference, never the value."""
    if env:
        value = environ.get(env)
        if value is None:
            raise ConfigError(f"{what}: environment variable {env} is not set")
        return value
    if file:
        try:
            return Path(file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read secret file {file}: {exc.strerror}") from None
    raise ConfigError(f"{what}: no secret reference (set *_env or *_file)")


async def read_token(*, env: str | None, file: str | None, command: tuple[str, ...],
                     environ: Mapping[str, str], what: str, timeout: float) -> str:
    """An OAuth2 bearer token, read afresh: `command`'s stdout when set, else the variable or file."""
    if command:
        return await run_token_command(command, what, timeout=timeout)
    return read_secret(env=env, file=file, environ=environ, what=f"{what} token")


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
