"""What every `popbridge` command receives from the command group: the typed click context object.

`services.cli` builds one `CommandContext` per run (settings from `POPBRIDGE_*`, the environment for
secret references, and what the composition root wires in); a command takes it with `@pass_command_context`
instead of reading `ctx.obj`. A command invoked outside the group must be given one (a test does:
`CliRunner().invoke(command, obj=CommandContext(...))`); without it click raises RuntimeError, a
programming error rather than a user's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import click

from schemas.events import MailFetched, RecipientsResolved
from services.runtime.settings import DeploymentSettings, MailConfig

# The router's decision for one fetched message under `config` at `now` (services.router.stage.reroute),
# wired in by services.cli so the ops commands can re-route without importing a service.
Reroute = Callable[[MailFetched, MailConfig, datetime], RecipientsResolved]


@dataclass(frozen=True)
class CommandContext:
    """Deployment settings, the environment for secret references, and the router's decision function."""

    settings: DeploymentSettings
    environ: dict[str, str] = field(default_factory=dict)
    reroute: Reroute | None = None


pass_command_context = click.make_pass_decorator(CommandContext)
