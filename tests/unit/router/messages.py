"""Building raw test messages: header fields joined with CRLF, an empty line, a body."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from services.router.headers import header_section
from services.router.rules import REASONS, Decision, recipients_with_evidence, resolve
from services.runtime.settings import RoutingRules

SPEC_EXAMPLE = Path(__file__).with_name("spec_example.json")
SPEC_EXAMPLE_TOML = Path(__file__).with_name("spec_example.toml")

_ISP_HOP = (
    "Received: from mail.sender.example (mail.sender.example [198.51.100.7])\r\n"
    "\tby mx.isp.example.net (Postfix) with ESMTPS id 4XyZ1k2Lm3{for_clause};\r\n"
    "\tThu, 26 Nov 2026 10:00:00 +0100 (CET)"
)


def isp_hop(for_clause: str = "<mbox4711@isp.example.net>") -> str:
    """The ISP's own Received field, which anchors trust (ROUTING.md step 4); "" leaves out `for`."""
    return _ISP_HOP.format(for_clause=f"\r\n\tfor {for_clause}" if for_clause else "")


ISP_HOP = isp_hop()
SENDER_HOP = (
    "Received: from [192.0.2.10] (unknown [192.0.2.10])\r\n"
    "\tby mail.sender.example (Postfix) with ESMTPSA id 9AbC; Thu, 26 Nov 2026 09:59:58 +0100 (CET)"
)


def message(*fields: str, body: str = "Hello.\r\n", eol: str = "\r\n") -> bytes:
    """A raw message; fields may hold folded lines, 8-bit text is UTF-8 (surrogates become raw bytes)."""
    text = eol.join(field.replace("\r\n", eol) for field in fields) + eol + eol + body
    return text.encode("utf-8", "surrogateescape")


def route(rules: RoutingRules, *fields: str, body: str = "Hello.\r\n") -> Decision:
    return resolve(message(*fields, body=body), rules)


def assert_valid_decision(decision: Decision, raw: bytes, rules: RoutingRules) -> None:
    """What every decision promises (ROUTING.md section 4, Output and Always)."""
    assert decision.recipients
    assert list(decision.recipients) == sorted(set(decision.recipients))
    assert all(r == r.lower() and r.endswith("@" + rules.primary_domain) for r in decision.recipients)
    assert decision.reason in REASONS
    # The defensive wrapper in resolve() must not be what decided: only a NUL gives `malformed`.
    assert (decision.reason == "malformed") == (b"\x00" in header_section(raw))
    json.dumps(decision.to_json_dict())
    msgspec.json.encode(recipients_with_evidence(decision))
