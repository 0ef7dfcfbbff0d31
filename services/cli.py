"""The `popbridge` command: one click group whose subcommands load lazily from the services.

This is the only module that reads the environment: `POPBRIDGE_*` variables become a
`DeploymentSettings` on the click context object (a `services.runtime.context.CommandContext`), with the
environment mapping for the commands that resolve referenced secrets. A `ConfigError` anywhere becomes one
line and exit code 2.
"""

from __future__ import annotations

import importlib
import os
import sys
from datetime import datetime
from typing import Any

import click

from schemas.events import MailFetched, RecipientsResolved
from services.runtime.context import CommandContext
from services.runtime.logs import setup_logging
from services.runtime.memory import pin_mmap_threshold
from services.runtime.settings import ConfigError, DeploymentSettings, MailConfig

# name -> "module:attribute" of a click command; imported only when that command runs.
COMMANDS = {
    "topics": "services.ops.topics:topics",
    "fetcher": "services.fetcher.commands:fetcher",
    "router": "services.router.worker:router",
    "route": "services.router.commands:route",
    "deliverer": "services.deliverer.commands:deliverer",
    "dlq": "services.ops.dlq:dlq",
    "run": "services.single.run:run",
    "demo": "services.demo.demo:demo",
    "lag": "services.ops.commands:lag",
    "replay": "services.ops.commands:replay",
    "trace": "services.ops.commands:trace",
    "oauth": "services.ops.oauth:oauth",
}


class LazyGroup(click.Group):
    """click's documented lazy-loading group: `--help` and each command import only what they need."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            # Ctrl-C where no stage's own handler runs (starting up, `router --until-idle`): one line and
            # the shell's 130, as `popbridge run` ends after SIGINT; click alone says "Aborted!", exit 1.
            click.echo("popbridge: interrupted", err=True)
            raise SystemExit(130) from None


def deployment_settings(environ: dict[str, str]) -> DeploymentSettings:
    """Deployment knobs from the environment, as Kubernetes sets them."""
    port = environ.get("POPBRIDGE_HTTP_PORT", "0") or "0"
    if not port.isdigit():
        raise ConfigError(f"environment: POPBRIDGE_HTTP_PORT: not a port number: {port!r}")
    return DeploymentSettings(
        kafka_bootstrap=environ.get("POPBRIDGE_KAFKA_BOOTSTRAP") or None,
        kafka_security_protocol=environ.get("POPBRIDGE_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT"),
        kafka_sasl_mechanism=environ.get("POPBRIDGE_KAFKA_SASL_MECHANISM") or None,
        kafka_sasl_username=environ.get("POPBRIDGE_KAFKA_SASL_USERNAME") or None,
        kafka_sasl_password_file=environ.get("POPBRIDGE_KAFKA_SASL_PASSWORD_FILE") or None,
        kafka_ca_file=environ.get("POPBRIDGE_KAFKA_CA_FILE") or None,
        kafka_compression=_compression(environ.get("POPBRIDGE_KAFKA_COMPRESSION", "")),
        topic_prefix=environ.get("POPBRIDGE_TOPIC_PREFIX", ""),
        group_prefix=environ.get("POPBRIDGE_GROUP_PREFIX", "popbridge"),
        log_level=environ.get("POPBRIDGE_LOG_LEVEL", "INFO"),
        data_dir=environ.get("POPBRIDGE_DATA_DIR", ""),
        http_port=int(port),
    )


def _compression(value: str) -> str | None:
    if value in ("", "none"):
        return None
    if value not in ("gzip", "snappy", "lz4", "zstd"):
        choices = "none, gzip, snappy, lz4 or zstd"
        raise ConfigError(f"environment: POPBRIDGE_KAFKA_COMPRESSION: {value!r} is not {choices}")
    return value


@click.group(cls=LazyGroup)
@click.version_option(package_name="popbridge")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """popbridge: fetch mail from POP3 mailboxes and deliver it to the right local recipients."""
    environ = dict(os.environ)
    if "MALLOC_MMAP_THRESHOLD_" not in environ:  # glibc's own knob, set by an operator: it wins
        pin_mmap_threshold()
    settings = deployment_settings(environ)
    json_logs = {"json": True, "text": False}.get(environ.get("POPBRIDGE_LOG_FORMAT", ""))
    setup_logging(settings.log_level, json_lines=json_logs)
    ctx.obj = CommandContext(settings=settings, environ=environ, reroute=_route_or_postmaster)


def _route_or_postmaster(event: MailFetched, config: MailConfig, now: datetime) -> RecipientsResolved:
    """The router's decision, for `replay --shadow` (services.ops imports no service); imported only when
    a shadow replay runs."""
    from services.router.stage import route_or_postmaster  # noqa: PLC0415  # lazy: the CLI stays quick

    return route_or_postmaster(event, config, now)


def main(argv: list[str] | None = None) -> Any:
    try:
        return cli.main(args=argv, prog_name="popbridge", standalone_mode=True)
    except ConfigError as exc:
        click.echo(f"popbridge: config error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
