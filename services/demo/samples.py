"""The sample mail and configuration of `popbridge demo`: ROUTING.md's example organisation, and one message
per routing case a catch-all mailbox meets.

The ISP (`mx.isp.example.net`) drops every message for example.com into the catch-all mailbox `mbox4711`
and, qmail-style, prepends `Delivered-To: mbox4711-<user>@example.com` above its own Received field.
"""

from __future__ import annotations

from dataclasses import dataclass

DEMO_USER = "mbox4711"
PASSWORD_ENV = "POPBRIDGE_DEMO_POP3_PASSWORD"  # noqa: S105 -- the name of a variable, not a password
DATE = "Tue, 01 Dec 2026 09:00:00 +0000"


@dataclass(frozen=True)
class Sample:
    """One message in the catch-all mailbox and what it shows."""

    case: str
    raw: bytes


def config_toml(pop3_host: str, pop3_port: int, smtp_host: str, smtp_port: int) -> str:
    """The demo's mail configuration: one catch-all mailbox, delivered to the demo SMTP receiver."""
    return f"""\
[delivery]
host = "{smtp_host}"
port = {smtp_port}
tls = "none"
retry_delays = [1.0]
max_age_days = 0.001

[routing]
primary_domain = "example.com"
local_domains = ["example.com"]
alias_domains = {{ "example.org" = "example.com" }}
users = ["alice", "bob", "carol", "dave", "erin", "frank", "postmaster", "lists"]
aliases = {{ sales = ["alice@example.com", "bob@example.com"], info = ["carol@example.com"] }}
recipient_delimiter = "+"
postmaster = "postmaster@example.com"
trusted_received_hosts = ["mx.isp.example.net"]
delivered_to_strip_prefix = "{DEMO_USER}-"
list_rules = [{{ list_id = "announce.lists.example.net", deliver_to = "lists@example.com" }}]

[[mailboxes]]
id = "catchall"
host = "{pop3_host}"
port = {pop3_port}
tls = "none"
username = "{DEMO_USER}"
password_env = "{PASSWORD_ENV}"
mode = "delete"
"""


def _isp_copy(rcpt: str, headers: str, body: str, *, forged: str = "") -> bytes:
    """A message as the ISP stores it: its Delivered-To and Received on top of what the sender wrote
    (`forged` fields sit below the trusted Received, where the sender put them)."""
    text = (
        f"Delivered-To: {DEMO_USER}-{rcpt}@example.com\n"
        "Received: from mail.sender.example (mail.sender.example [192.0.2.10])\n"
        f"\tby mx.isp.example.net (Postfix) with ESMTPS id 4Zq{len(headers):04d}\n"
        f"\tfor <{DEMO_USER}-{rcpt}@example.com>; {DATE}\n"
        f"{forged}{headers}Date: {DATE}\n\n{body}\n"
    )
    return text.replace("\n", "\r\n").encode()


def samples() -> list[Sample]:
    """The catch-all mailbox's content, in delivery order."""
    party = "From: Olga <olga@partner.example>\nTo: alice@example.com\nSubject: Party on Friday\n" \
            "Message-ID: <party-1@partner.example>\n"
    return [
        Sample("Bcc: dave is named only in Delivered-To",
               _isp_copy("dave", "From: Ivan <ivan@partner.example>\nTo: ivan@partner.example\n"
                         "Subject: Quarterly figures (Bcc)\nMessage-ID: <q3@partner.example>\n",
                         "Dave, see attachment.")),
        Sample("mailing list: List-Id rule",
               _isp_copy("erin", "From: Announce <announce@lists.example.net>\n"
                         "To: announce@lists.example.net\nSubject: [announce] New release\n"
                         "List-Id: Announcements <announce.lists.example.net>\n"
                         "Message-ID: <rel-7@lists.example.net>\n", "Version 7 is out.")),
        Sample("forged Delivered-To: carol below the ISP's Received is ignored",
               _isp_copy("bob", "From: Mallory <mallory@evil.example>\nTo: bob@example.com\n"
                         "Subject: Invoice overdue\nMessage-ID: <inv-1@evil.example>\n",
                         "Please pay.", forged="Delivered-To: carol@example.com\n")),
        Sample("plus address: alice+shop is alice",
               _isp_copy("alice+shop", "From: Shop <orders@shop.example>\nTo: alice+shop@example.com\n"
                         "Subject: Your order shipped\nMessage-ID: <order-55@shop.example>\n",
                         "Order 55 is on its way.")),
        Sample("alias: sales is alice and bob",
               _isp_copy("sales", "From: Customer <buyer@client.example>\nTo: sales@example.com\n"
                         "Subject: Request for quote\nMessage-ID: <rfq-3@client.example>\n",
                         "Please quote 100 units.")),
        Sample("unknown user: zoe goes to the postmaster",
               _isp_copy("zoe", "From: Someone <someone@far.example>\nTo: zoe@example.com\n"
                         "Subject: Hello Zoe\nMessage-ID: <hi-zoe@far.example>\n", "Are you there?")),
        # Sent to alice and alice+party: the ISP stores two copies; whichever is routed first delivers.
        Sample("same message to alice and alice+party (copy 1)", _isp_copy("alice", party, "Bring snacks.")),
        Sample("same message to alice and alice+party (copy 2)",
               _isp_copy("alice+party", party, "Bring snacks.")),
    ]
