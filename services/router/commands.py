"""`popbridge route`: the routing decision for raw message files, one JSON object per line (ROUTING.md).

A config error propagates as `ConfigError` (services.cli turns it into one line and exit code 2); an
unreadable message file is one line and exit code 2 as well. A decision, even a postmaster one, exits 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from services.router.rules import resolve
from services.runtime.settings import load_routing_rules


class UnreadableMessage(click.ClickException):
    """A MESSAGE argument cannot be read: a usage problem, reported in one line."""

    exit_code = 2


def _read_message(message: str) -> bytes:
    if message == "-":
        return click.get_binary_stream("stdin").read()
    try:
        return Path(message).read_bytes()
    except OSError as exc:
        raise UnreadableMessage(f"cannot read message {message}: {exc.strerror or exc}") from None


@click.command("route")
@click.option(
    "--config",
    "config_path",
    required=True,
    metavar="FILE",
    help="JSON or TOML file holding the routing keys of one catch-all mailbox (ROUTING.md section 1).",
)
@click.argument("messages", nargs=-1, required=True, metavar="MESSAGE...")
def route(config_path: str, messages: tuple[str, ...]) -> None:
    """Print who receives each raw MESSAGE (a file, or - for standard input) and why."""
    rules = load_routing_rules(config_path)
    for message in messages:
        decision = resolve(_read_message(message), rules)
        click.echo(json.dumps({**decision.to_json_dict(), "message": message}))
