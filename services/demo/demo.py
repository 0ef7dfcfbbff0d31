"""`popbridge demo`: the whole pipeline on this machine, with throwaway servers, in a few seconds.

A POP3 server on loopback holds a catch-all mailbox filled with sample mail (services.demo.samples):
Dovecot when it is installed, else the built-in one (pop3.py). A small SMTP receiver (smtp.py) plays
the organisation's mail server. `popbridge run --until-idle` then runs on the embedded log in a temporary
data directory, and the demo prints who received each message and why. Everything it started is stopped
and the temporary directory removed, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Protocol

import click

from schemas import codec
from schemas.events import RecipientsResolved
from schemas.topics import ROUTED
from services.demo.dovecot import DemoDovecot, DovecotError, dovecot_binary
from services.demo.pop3 import DemoPop3Server
from services.demo.samples import DEMO_USER, PASSWORD_ENV, Sample, config_toml, samples
from services.demo.smtp import DemoSmtpServer, ReceivedMail
from services.runtime.connect import open_log
from services.runtime.log import Log
from services.runtime.settings import DeploymentSettings, load_config
from services.single.run import Pipeline, RunSummary

LOCAL_DOMAIN = "example.com"


@dataclass(frozen=True)
class Row:
    """One line of the demo's table."""

    subject: str
    delivered_to: tuple[str, ...]
    why: str
    case: str


@dataclass(frozen=True)
class DemoResult:
    rows: list[Row]
    summary: RunSummary
    received: list[ReceivedMail]
    left_on_pop3: int
    pop3_server: str


class Pop3Prop(Protocol):
    """What the demo needs of its POP3 server: an address, and how many messages it still holds."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def remaining(self) -> int: ...


@contextlib.asynccontextmanager
async def pop3_server(kind: str, password: str, mail: Sequence[bytes]) -> AsyncIterator[Pop3Prop]:
    """Dovecot (kind "dovecot", or "auto" when installed) or the built-in server, filled with `mail`."""
    binary = dovecot_binary() if kind in ("auto", "dovecot") else None
    if kind == "dovecot" and binary is None:
        raise click.UsageError("--pop3 dovecot: the dovecot binary is not installed")
    dovecot = DemoDovecot(binary, DEMO_USER, password) if binary is not None else None
    try:
        if dovecot is not None:
            dovecot.start()
    except DovecotError as exc:
        if kind == "dovecot":
            raise click.ClickException(str(exc)) from None
        logging.getLogger("popbridge.demo").warning("%s; using the built-in POP3 server", exc)
        dovecot = None
    if dovecot is not None:
        try:
            dovecot.deliver_many(mail)
            yield dovecot
        finally:
            dovecot.stop()
        return
    async with DemoPop3Server(DEMO_USER, password, mail) as builtin:
        yield builtin


async def run_demo(kind: str) -> DemoResult:
    mail = samples()
    root = Path(tempfile.mkdtemp(prefix="popbridge-demo-"))
    try:
        password = secrets.token_urlsafe(16)
        async with DemoSmtpServer() as smtp, pop3_server(kind, password, [s.raw for s in mail]) as pop3:
            config_file = root / "popbridge.toml"
            config_file.write_text(config_toml(pop3.host, pop3.port, smtp.host, smtp.port), encoding="utf-8")
            settings = DeploymentSettings(data_dir=str(root / "data"))
            log = open_log(settings)
            environ = {PASSWORD_ENV: password}
            pipeline = Pipeline(log, settings, load_config(config_file), environ, poll_seconds=0.1)
            summary = await pipeline.run(until_idle=True, stop=asyncio.Event())
            routed = await _routed(log, settings)
            left = pop3.remaining
            server = "Dovecot" if isinstance(pop3, DemoDovecot) else "built-in POP3 server"
        return DemoResult(table(mail, routed, smtp.received), summary, smtp.received, left, server)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _routed(log: Log, settings: DeploymentSettings) -> list[RecipientsResolved]:
    return [codec.decode(r.value, RecipientsResolved) async for r in log.scan(settings.topic(ROUTED))]


def table(
    mail: Sequence[Sample], routed: Sequence[RecipientsResolved], received: Sequence[ReceivedMail]
) -> list[Row]:
    """One row per sample: who the SMTP server received it for, and the router's reason."""
    rows = []
    for sample in mail:
        event = next((e for e in routed if e.raw == sample.raw), None)
        delivered = sorted({r for m in received if m.content.endswith(sample.raw) for r in m.rcpt_tos})
        rows.append(Row(_subject(sample.raw), tuple(delivered), _why(event), sample.case))
    return rows


def _subject(raw: bytes) -> str:
    return str(BytesHeaderParser(policy=compat32).parsebytes(raw)["Subject"] or "(no subject)")


def _why(event: RecipientsResolved | None) -> str:
    if event is None:
        return "not routed"
    evidence = next((e for r in event.recipients for e in r.evidence if e.value), None)
    reasons = [f"{event.reason}: {evidence.value}" if evidence else event.reason] if event.recipients else []
    if event.suppressed:
        copies = ", ".join(sorted(r.address for r in event.suppressed))
        reasons.append(f"duplicate: {copies} got another copy")
    return "; ".join(reasons)


def render(result: DemoResult, seconds: float) -> str:
    header = Row("Subject", ("Delivered to",), "Why", "Case")
    rows = [header, *result.rows]
    cells = [(r.subject, ", ".join(r.delivered_to) or "-", r.why, r.case) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3] for c in cells]
    lines.insert(1, "-" * len(lines[0]))
    copies = sum(len(m.rcpt_tos) for m in result.received)
    outside = sorted({r for m in result.received for r in m.rcpt_tos if not r.endswith("@" + LOCAL_DOMAIN)})
    lines += [
        "",
        f"{len(result.rows)} messages fetched from the catch-all mailbox ({result.pop3_server}), "
        f"{result.left_on_pop3} left on it; {copies} copies delivered over SMTP, "
        + (f"OUTSIDE {LOCAL_DOMAIN}: {', '.join(outside)}" if outside else f"all inside {LOCAL_DOMAIN}")
        + f"; {seconds:.1f} s",
    ]
    return "\n".join(lines)


def healthy(result: DemoResult) -> bool:
    """Every message delivered (or suppressed as a duplicate), none left on POP3, nothing sent outside."""
    inside = all(r.endswith("@" + LOCAL_DOMAIN) for m in result.received for r in m.rcpt_tos)
    placed = all(row.delivered_to or "duplicate" in row.why for row in result.rows)
    return inside and placed and result.left_on_pop3 == 0


@click.command()
@click.option("--pop3", "kind", type=click.Choice(["auto", "dovecot", "builtin"]), default="auto",
              show_default=True, help="The throwaway POP3 server: Dovecot if installed (auto), or built in.")
@click.option("--verbose", is_flag=True, help="Show the stages' log lines on stderr.")
def demo(kind: str, verbose: bool) -> None:
    """Run the pipeline against throwaway local POP3 and SMTP servers with sample mail; print who got what.

    Needs nothing but popbridge: the log is the embedded one in a temporary directory, removed at the
    end, and every server listens on 127.0.0.1 only.
    """
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
    started = time.monotonic()
    result = asyncio.run(run_demo(kind))
    click.echo(render(result, time.monotonic() - started))
    if not healthy(result):
        raise click.ClickException("the demo did not deliver as expected (see the table above)")
