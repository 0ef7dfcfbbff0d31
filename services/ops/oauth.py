"""`popbridge oauth login NAME` and `popbridge oauth status`: the person's side of popbridge's OAuth2.

`login` runs the device authorization grant (RFC 8628) for one mailbox (or `delivery`, the deliverer's SMTP
login): it prints where to go and which code to enter, waits, and stores the refresh token under
POPBRIDGE_DATA_DIR/oauth2 (0600). `status` shows each login's token state without any token.

Exit codes: 0 fine (`status`: every login has a usable token or can get one); 1 the login failed or,
for `status`, a login needs `popbridge oauth login`; 2 a usage or configuration mistake.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import click

from services.runtime.context import CommandContext, pass_command_context
from services.runtime.oauth2 import OAuth2Error, TokenState, login_hint
from services.runtime.oauth2_tokens import DELIVERY, TokenSources, device_login, oauth2_directory
from services.runtime.settings import ConfigError, MailConfig, OAuth2, load_config

_CONFIG = click.option("--config", "config_path", required=True,
                       type=click.Path(dir_okay=False, path_type=Path), help="The mail configuration (TOML).")


@click.group()
def oauth() -> None:
    """OAuth2 logins for cloud mailboxes ([oauth2] tables): sign in, and see the tokens' state."""


def oauth2_logins(config: MailConfig) -> Iterator[tuple[str, OAuth2]]:
    """(name, table) of every login that popbridge gets tokens for: the mailboxes, then `delivery`."""
    for mailbox in config.mailboxes:
        if mailbox.oauth2 is not None:
            yield mailbox.id, mailbox.oauth2
    if config.delivery.oauth2 is not None:
        yield DELIVERY, config.delivery.oauth2


@oauth.command()
@click.argument("name")
@_CONFIG
@click.option("--max-wait", default=900.0, show_default=True, help="Seconds to wait for the sign-in.")
@pass_command_context
def login(context: CommandContext, name: str, config_path: Path, max_wait: float) -> None:
    """Sign in mailbox NAME (or `delivery`) with a code shown here, and store its refresh token."""
    logins = dict(oauth2_logins(load_config(config_path)))
    table = logins.get(name)
    if table is None:
        known = ", ".join(logins) or "none"
        raise ConfigError(f"{config_path}: {name!r} has no [oauth2] table (logins with one: {known})")
    if table.grant != "refresh_token":
        raise ConfigError(f"{config_path}: {name}: grant = {table.grant!r} is app-only: no sign-in needed")
    sources = TokenSources(oauth2_directory(context.settings.data_dir), context.environ)
    try:
        asyncio.run(device_login(sources.source(name, table), click.echo, max_wait=max_wait))
    except OAuth2Error as exc:
        click.echo(f"popbridge: {exc}", err=True)
        raise SystemExit(1) from None
    click.echo(f"{name}: signed in; the refresh token is stored in {sources.store.path(name)}")


@oauth.command()
@_CONFIG
@click.option("--json", "as_json", is_flag=True, help="One JSON object per login.")
@pass_command_context
def status(context: CommandContext, config_path: Path, as_json: bool) -> None:
    """Each login's token state: expiry, last renewal, last error (never a token)."""
    sources = TokenSources(oauth2_directory(context.settings.data_dir), context.environ)
    rows = [status_row(name, table, sources.store.load(name), time.time())
            for name, table in oauth2_logins(load_config(config_path))]
    for row in rows:
        click.echo(json.dumps(row, sort_keys=True) if as_json else status_line(row))
    if any(row["state"] == "login-required" for row in rows):
        raise SystemExit(1)


def status_row(name: str, table: OAuth2, state: TokenState, now: float) -> dict[str, str | float | None]:
    """What `status` shows of one login; the tokens themselves are left out by construction."""
    if state.login_required or (table.grant == "refresh_token" and not state.refresh_token):
        shown = "login-required"
    elif state.access_token and state.expires_at > now:
        shown = "valid"
    else:
        shown = "renews-on-next-use"
    return {
        "name": name, "grant": table.grant, "state": shown,
        "expires_at": _when(state.expires_at), "last_refresh": _when(state.last_refresh),
        "last_error": state.last_error or None, "last_error_at": _when(state.last_error_at),
    }  # fmt: skip


def status_line(row: dict[str, str | float | None]) -> str:
    line = f"{row['name']}: {row['state']} ({row['grant']}); expires {row['expires_at'] or '-'}, " \
           f"last refresh {row['last_refresh'] or '-'}"
    if row["state"] == "login-required":
        line += f"; {login_hint(str(row['name']))}"
    if row["last_error"]:
        line += f"; last error at {row['last_error_at']}: {row['last_error']}"
    return line


def _when(seconds: float) -> str | None:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds") if seconds else None
