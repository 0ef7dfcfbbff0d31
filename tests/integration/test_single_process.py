"""Journeys through `popbridge run`: the three stages in one process, real Dovecot, a real SMTP server.

The crash test kills `popbridge run` with SIGKILL at random moments (the seed is printed;
POPBRIDGE_TEST_SEED replays it), adds mail between runs, then runs it to idle. Every (message,
recipient) must arrive exactly once and the POP3 mailbox must end empty. The one duplicate no SMTP
client can prevent is a copy the server accepted just before the kill, before the delivered ledger
recorded it (RFC 1047): such a copy is identified right after each kill (accepted by the sink, absent
from the ledger) and may arrive twice; the test reports how many there were, and any other duplicate
fails it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from schemas import codec
from schemas.events import RecipientDelivered, RecipientsResolved
from schemas.topics import DEAD_LETTERS, DELIVERED, ROUTED
from services.runtime.embedded import EmbeddedLog
from tests.support.dovecot import DovecotMailboxes, MailUser
from tests.support.mail_config import delivery_to, mailbox, write_mail_config
from tests.support.smtp import ReceivedMessage, SmtpSink

pytestmark = pytest.mark.integration

POPBRIDGE = str(Path(sys.executable).with_name("popbridge"))
PASSWORD_ENV = "TEST_POP3_PASSWORD"
PREFIX = "mbox"  # delivered_to_strip_prefix is "mbox-"
USERS = ("alice", "bob", "carol", "dave", "postmaster")
# Delivered-To local part -> who gets the copy (aliases, plus addresses, unknown users)
TARGETS = {
    "alice": {"alice"}, "bob": {"bob"}, "sales": {"alice", "bob"}, "carol+news": {"carol"},
    "zoe": {"postmaster"}, "dave": {"dave"},
}  # fmt: skip
_TRACE_ID = re.compile(rb"with POP3\s+id <([0-9a-f]+)>")
_MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>]+>)", re.MULTILINE | re.IGNORECASE)


def config(path: Path, user: MailUser, pop3: tuple[str, int], smtp: SmtpSink) -> Path:
    routing = {
        "primary_domain": "example.com", "local_domains": ["example.com"], "users": list(USERS),
        "aliases": {"sales": ["alice@example.com", "bob@example.com"]},
        "postmaster": "postmaster@example.com",
        "trusted_received_hosts": ["mx.isp.example.net"], "delivered_to_strip_prefix": f"{PREFIX}-",
    }  # fmt: skip
    catchall = mailbox("catchall", *pop3, user.login, (), password_env=PASSWORD_ENV, poll_interval=1.0)
    return write_mail_config(path, delivery=delivery_to(smtp.port, smtp.host), routing=routing,
                             mailboxes=[catchall])


def isp_copy(rcpt: str, message_id: str, *, to: str = "partner@partner.example", body: str = "Hi.") -> bytes:
    """A copy as the ISP stores it: its Delivered-To and Received above the sender's fields."""
    return (
        f"Delivered-To: {PREFIX}-{rcpt}@example.com\r\n"
        "Received: from mail.partner.example (mail.partner.example [192.0.2.7])\r\n"
        f"\tby mx.isp.example.net with ESMTPS id X1\r\n\tfor <{PREFIX}-{rcpt}@example.com>;"
        " Tue, 01 Dec 2026 09:00:00 +0000\r\n"
        f"From: Pat <pat@partner.example>\r\nTo: {to}\r\nCc: other@elsewhere.example\r\n"
        f"Subject: message {message_id}\r\nMessage-ID: {message_id}\r\n\r\n{body}\r\n"
    ).encode()


@dataclass(frozen=True)
class Mail:
    """One message sent to the organisation, as one or more copies in the catch-all."""

    message_id: str
    copies: tuple[bytes, ...]
    recipients: frozenset[str]


def make_mail(rng: random.Random, start: int, count: int) -> list[Mail]:
    mails = []
    for number in range(start, start + count):
        message_id = f"<m{number}@partner.example>"
        rcpts = rng.sample(sorted(TARGETS), rng.choice((1, 1, 2)))  # 2 copies: a duplicate for dedupe
        copies = tuple(isp_copy(r, message_id, body=f"Message {number}.\r\n.a dot line") for r in rcpts)
        mails.append(Mail(message_id, copies, frozenset(t for r in rcpts for t in TARGETS[r])))
    return mails


def pop3_address(dovecot: DovecotMailboxes) -> tuple[str, int]:
    return dovecot.server.host, dovecot.server.pop3_port


def environment(data_dir: Path, password: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POPBRIDGE_")}
    return {**env, "POPBRIDGE_DATA_DIR": str(data_dir), PASSWORD_ENV: password, "POPBRIDGE_LOG_LEVEL": "INFO"}


def delivered_pairs(messages: Sequence[ReceivedMessage]) -> Iterator[tuple[str, str, str]]:
    """(fetch id, Message-ID, recipient local part) of every copy the sink accepted."""
    for message in messages:
        fetch_id = _TRACE_ID.search(message.content)
        message_id = _MESSAGE_ID.search(message.content)
        assert fetch_id, message.content[:400]
        assert message_id, message.content[:400]
        for rcpt in message.rcpt_tos:
            yield fetch_id.group(1).decode(), message_id.group(1).decode(), rcpt


async def ledger(data_dir: Path) -> set[tuple[str, str]]:
    log = EmbeddedLog(data_dir)
    entries = [codec.decode(r.value, RecipientDelivered) async for r in log.scan(DELIVERED)]
    return {(e.fetch_id, e.recipient) for e in entries}


async def popbridge_run(
    config_file: Path, env: dict[str, str], log_file: Path, *args: str
) -> asyncio.subprocess.Process:
    with log_file.open("ab") as output:
        return await asyncio.create_subprocess_exec(
            POPBRIDGE, "run", "--config", str(config_file), *args, env=env, stdout=output, stderr=output
        )


async def while_delivering(sink: SmtpSink, rng: random.Random, timeout: float = 15.0) -> None:
    """Return a random few milliseconds after the sink accepted a new copy: a kill in mid-delivery."""
    seen = len(sink.messages)
    # Awaits the sink's own signal; none within `timeout` means everything was delivered already: the
    # kill then finds it idle, which is a moment worth testing too.
    with contextlib.suppress(AssertionError):
        await asyncio.to_thread(sink.wait_for, seen + 1, timeout)
    await asyncio.sleep(rng.uniform(0, 0.03))  # the random moment of the kill, not a wait


async def test_killed_at_random_moments_it_loses_nothing_and_delivers_nothing_twice(
    dovecot: DovecotMailboxes, smtp_sink: SmtpSink, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    user = dovecot.new_user("catchall")
    config_file = config(tmp_path / "popbridge.toml", user, pop3_address(dovecot), smtp_sink)
    data_dir, log_file = tmp_path / "data", tmp_path / "popbridge.log"
    env = environment(data_dir, user.password)
    mails: list[Mail] = []
    # Per (Message-ID, recipient): at how many kills a copy was accepted but not yet in the ledger. Each
    # such kill may cost one extra copy (the same pair can be caught in the window by several kills).
    at_risk: Counter[tuple[str, str]] = Counter()
    kills = 0
    for round_ in range(5):
        new = make_mail(rng, len(mails), rng.randint(5, 25))
        dovecot.deliver_many(user, [copy for mail in new for copy in mail.copies])
        mails += new
        process = await popbridge_run(config_file, env, log_file)
        if rng.random() < 0.5:
            await asyncio.sleep(rng.uniform(0.5, 8.0))  # any moment: start, fetch, route, deliver, idle
        else:
            await while_delivering(smtp_sink, rng)
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        await process.wait()
        in_ledger = await ledger(data_dir) if (data_dir / "log.sqlite3").exists() else set()
        at_risk.update(
            {
                (mid, rcpt)
                for fid, mid, rcpt in delivered_pairs(smtp_sink.messages)
                if (fid, rcpt) not in in_ledger
            }
        )
        print(f"round {round_}: killed; {len(smtp_sink.messages)} transactions so far")

    final = await popbridge_run(config_file, env, log_file, "--until-idle")
    assert await asyncio.wait_for(final.wait(), 120) == 0, log_file.read_text()[-3000:]

    expected = Counter((m.message_id, f"{r}@example.com") for m in mails for r in m.recipients)
    got = Counter((mid, rcpt) for _, mid, rcpt in delivered_pairs(smtp_sink.messages))
    missing = expected - got
    twice = {pair: n for pair, n in got.items() if n > 1}
    unexplained = {pair: n for pair, n in twice.items() if n > 1 + at_risk[pair]}
    print(f"{kills} kills, {len(expected)} pairs, {len(twice)} re-sent after a kill in RFC 1047's window")
    assert not missing
    assert set(got) == set(expected)  # nobody else, in particular nobody outside example.com
    assert not unexplained
    assert dovecot.message_count(user) == 0
    log = EmbeddedLog(data_dir)
    assert [r async for r in log.scan(DEAD_LETTERS)] == []


@pytest.mark.parametrize("log_kind", ["embedded", "kafka"])
async def test_bcc_recipient_named_only_in_delivered_to_gets_the_message_and_nothing_goes_outside(
    log_kind: str,
    dovecot: DovecotMailboxes,
    smtp_sink: SmtpSink,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    user = dovecot.new_user("catchall")
    dovecot.deliver(user, isp_copy("dave", "<bcc-1@partner.example>", to="alice@partner.example"))
    config_file = config(tmp_path / "popbridge.toml", user, pop3_address(dovecot), smtp_sink)
    env = environment(tmp_path / "data", user.password)
    if log_kind == "kafka":
        prefix: str = request.getfixturevalue("kafka_topic_prefix")
        env |= {
            "POPBRIDGE_KAFKA_BOOTSTRAP": request.getfixturevalue("kafka_bootstrap"),
            "POPBRIDGE_TOPIC_PREFIX": prefix,
            "POPBRIDGE_GROUP_PREFIX": prefix + "popbridge",
        }

    process = await popbridge_run(config_file, env, tmp_path / "popbridge.log", "--until-idle")
    assert await asyncio.wait_for(process.wait(), 120) == 0, (tmp_path / "popbridge.log").read_text()[-3000:]

    [received] = smtp_sink.messages
    assert received.rcpt_tos == ("dave@example.com",)
    assert received.content.endswith(isp_copy("dave", "<bcc-1@partner.example>", to="alice@partner.example"))
    assert smtp_sink.refused == []
    assert dovecot.message_count(user) == 0
    if log_kind == "embedded":
        log = EmbeddedLog(tmp_path / "data")
        [routed] = [codec.decode(r.value, RecipientsResolved) async for r in log.scan(ROUTED)]
        assert routed.reason == "delivered-to"
        assert [r.address for r in routed.recipients] == ["dave@example.com"]
        assert [r async for r in log.scan(DEAD_LETTERS)] == []


async def test_without_until_idle_it_keeps_polling_and_stops_cleanly_on_sigterm(
    dovecot: DovecotMailboxes, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    user = dovecot.new_user("catchall")
    config_file = config(tmp_path / "popbridge.toml", user, pop3_address(dovecot), smtp_sink)
    log_file = tmp_path / "popbridge.log"
    process = await popbridge_run(config_file, environment(tmp_path / "data", user.password), log_file)
    try:
        dovecot.deliver(user, isp_copy("alice", "<late-1@partner.example>"))  # arrives while it runs
        await asyncio.to_thread(smtp_sink.wait_for, 1, 30)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0, log_file.read_text()[-3000:]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert [m.rcpt_tos for m in smtp_sink.messages] == [("alice@example.com",)]
    assert "deliver: 1 delivered" in log_file.read_text()
    assert dovecot.message_count(user) == 0
