"""popbridge never hands its own MTA an address that MTA would relay outside: proved against a real Postfix.

The Postfix (tests/support/postfix.py) trusts popbridge as a `mynetworks` client with the percent hack and
bang paths on, as a default Debian Postfix does. First the control: the same hostile addresses, given to
that Postfix directly, are resolved to `outside.test` and queued for it, so the setup would see a relay.
Then the journey: `popbridge run` drains a real Dovecot catch-all holding ISP copies addressed to those
addresses (in Delivered-To above the ISP's trusted Received), routes them (with and without a `users`
list) and delivers to the Postfix. Postfix must have delivered everything to the local domain and queued
nothing for any other.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from schemas import codec
from schemas.events import RecipientsResolved
from schemas.topics import ROUTED
from services.runtime.embedded import EmbeddedLog
from tests.support.dovecot import DovecotMailboxes
from tests.support.mail_config import delivery_to, mailbox, write_mail_config
from tests.support.postfix import LOCAL_DOMAIN, Postfix

pytestmark = pytest.mark.integration

POPBRIDGE = str(Path(sys.executable).with_name("popbridge"))
ISP_HOST = "mx.isp.example.net"
# Local parts Postfix (allow_percent_hack, swap_bangpath, resolve_dequoted_address: all defaults) or
# Sendmail/Exim would read as a route to outside.test.
HOSTILE = (
    f"evil%outside.test@{LOCAL_DOMAIN}",
    f"evil%outside.test%{LOCAL_DOMAIN}@{LOCAL_DOMAIN}",
    f'"evil@outside.test"@{LOCAL_DOMAIN}',
    f'"evil%outside.test"@{LOCAL_DOMAIN}',
    f"outside.test!evil@{LOCAL_DOMAIN}",
    f"<@outside.test:evil@{LOCAL_DOMAIN}>",
    f'"@outside.test:evil"@{LOCAL_DOMAIN}',
    f"EVIL%OUTSIDE.TEST+tag@{LOCAL_DOMAIN}",
)


def isp_copy(number: int, delivered_to: str) -> bytes:
    """A copy as the ISP stored it in the catch-all: its Delivered-To above its own Received."""
    return (
        f"Delivered-To: {delivered_to}\r\n"
        "Received: from mail.attacker.example (mail.attacker.example [192.0.2.66])\r\n"
        f"\tby {ISP_HOST} with ESMTPS id H{number}\r\n\tfor <{delivered_to}>;"
        " Tue, 01 Dec 2026 09:00:00 +0000\r\n"
        f"From: Mallory <mallory@attacker.example>\r\nTo: {delivered_to}\r\n"
        f"Subject: hostile {number}\r\nMessage-ID: <hostile{number}@attacker.example>\r\n\r\nHello.\r\n"
    ).encode()


def config(
    path: Path, *, pop3: tuple[str, int], login: str, postfix: Postfix, users: Sequence[str] | None
) -> Path:
    """`users` None: no `users` list (every local part is a user)."""
    routing = {"primary_domain": LOCAL_DOMAIN, "local_domains": [LOCAL_DOMAIN],
               "postmaster": f"postmaster@{LOCAL_DOMAIN}", "trusted_received_hosts": [ISP_HOST]}
    if users is not None:
        routing["users"] = list(users)
    return write_mail_config(
        path, delivery=delivery_to(postfix.port, helo_name="popbridge.test"), routing=routing,
        mailboxes=[mailbox("catchall", *pop3, login, (), password_env="TEST_POP3_PASSWORD")],
    )  # fmt: skip


async def popbridge_run_until_idle(config_file: Path, data_dir: Path, password: str, log: Path) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POPBRIDGE_")}
    env |= {"POPBRIDGE_DATA_DIR": str(data_dir), "TEST_POP3_PASSWORD": password}
    with log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            POPBRIDGE, "run", "--config", str(config_file), "--until-idle", env=env, stdout=output,
            stderr=output,
        )
        return await asyncio.wait_for(process.wait(), 120)


def test_control_postfix_relays_the_hostile_addresses_when_they_reach_it(postfix: Postfix) -> None:
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as client:
        refused = client.sendmail("", [a.strip("<>") for a in HOSTILE], b"Subject: control\r\n\r\nHi.\r\n")
    # With the extension, the %-hack leaves `evil@outside.test+tag`: Postfix refuses that as bad syntax.
    assert set(refused) == {f"EVIL%OUTSIDE.TEST+tag@{LOCAL_DOMAIN}"}
    # Every other one but the plain source route (Postfix drops `@outside.test:`) is resolved to
    # outside.test: the %-hack (twice over), dequoting, the bang path, and a quoted route.
    log = postfix.wait_for_log("status=", len(HOSTILE) - 1)
    deferred = [line for line in log.splitlines() if "status=deferred (deferred transport)" in line]
    assert len(deferred) == len(HOSTILE) - 2, log
    assert all("@outside.test>" in line.split("to=<", 1)[1].split(",")[0] for line in deferred), log
    assert sum("to=<evil@outside.test>" in line for line in deferred) == 5, log
    assert {q.queue for q in postfix.queued()} == {"deferred"}


@pytest.mark.parametrize("users", [None, ("alice", "postmaster")], ids=["no-users", "users"])
async def test_hostile_recipients_reach_only_the_postmaster_and_postfix_queues_nothing_outside(
    postfix: Postfix, dovecot: DovecotMailboxes, tmp_path: Path, users: tuple[str, ...] | None
) -> None:
    user = dovecot.new_user("catchall")
    copies = [isp_copy(n, address) for n, address in enumerate(HOSTILE)]
    copies.append(isp_copy(len(HOSTILE), f"alice@{LOCAL_DOMAIN}"))  # a plain local copy beside them
    dovecot.deliver_many(user, copies)
    pop3 = (dovecot.server.host, dovecot.server.pop3_port)
    config_file = config(tmp_path / "popbridge.toml", pop3=pop3, login=user.login, postfix=postfix,
                         users=users)

    status = await popbridge_run_until_idle(config_file, tmp_path / "data", user.password,
                                            tmp_path / "run.log")

    assert status == 0, (tmp_path / "run.log").read_text()
    assert dovecot.message_count(user) == 0
    log = postfix.wait_for_log("status=", len(copies))
    deliveries = [line for line in log.splitlines() if "status=" in line]
    assert len(deliveries) == len(copies), log
    assert all("status=sent (delivered to the local domain)" in line for line in deliveries), log
    # The obsolete source route is dropped (ROUTING.md section 3): `evil` at the local domain remains,
    # a user when there is no users list, else an unknown one (the postmaster).
    routed_evil = f"evil@{LOCAL_DOMAIN}" if not users else f"postmaster@{LOCAL_DOMAIN}"
    expected = [f"postmaster@{LOCAL_DOMAIN}"] * (len(HOSTILE) - 1) + [routed_evil, f"alice@{LOCAL_DOMAIN}"]
    assert sorted(line.split("to=<", 1)[1].split(">", 1)[0] for line in deliveries) == sorted(expected)
    assert "outside.test" not in log
    assert postfix.queued() == []
    data = EmbeddedLog(tmp_path / "data")
    routed = [codec.decode(r.value, RecipientsResolved) async for r in data.scan(ROUTED)]
    reasons = sorted(r.reason for r in routed)
    assert reasons == sorted(["unsafe-local-part"] * (len(HOSTILE) - 1) + ["delivered-to"] * 2)


async def test_a_recipient_storm_is_split_below_postfixs_recipient_limit(
    postfix: Postfix, dovecot: DovecotMailboxes, tmp_path: Path
) -> None:
    """Postfix takes at most 100 RCPTs per transaction here (smtpd_recipient_limit); 250 all arrive."""
    user = dovecot.new_user("storm")
    people = [f"user{n}@{LOCAL_DOMAIN}" for n in range(250)]
    raw = isp_copy(0, people[0]).replace(
        f"Delivered-To: {people[0]}\r\n".encode(), "".join(f"Delivered-To: {p}\r\n" for p in people).encode()
    )
    dovecot.deliver(user, raw)
    pop3 = (dovecot.server.host, dovecot.server.pop3_port)
    config_file = config(tmp_path / "popbridge.toml", pop3=pop3, login=user.login, postfix=postfix,
                         users=None)

    status = await popbridge_run_until_idle(config_file, tmp_path / "data", user.password,
                                            tmp_path / "run.log")

    assert status == 0, (tmp_path / "run.log").read_text()
    log = postfix.wait_for_log("status=sent", len(people))
    assert "too many recipients" not in log.lower()
    assert sum("nrcpt=100 " in line for line in log.splitlines()) == 2, log
    assert sum("nrcpt=50 " in line for line in log.splitlines()) == 1, log
    assert postfix.queued() == []
