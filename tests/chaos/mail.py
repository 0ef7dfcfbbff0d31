"""The chaos run's mail, from a seed: every message carries a unique token and knows who must get it.

Single-user mailboxes send everything to their recipient. Catch-all mail (ROUTING.md) comes in four kinds,
so routing and the router's dedupe run under the faults:

- `envelope`: one copy, a trusted `Delivered-To` above the ISP's Received, forged ones below it;
- `isp-copies`: one copy per recipient (the ISP's drop into the catch-all), same Message-ID and body;
- `fallback-twice`: no trusted hop, so To/Cc decide; two identical copies, which the dedupe must merge;
- `unknown-user`: a Delivered-To naming no user: the postmaster gets it.

Recipients are named for what the scripted SMTP server does with them (tests.support.scripted_smtp):
`defer@` is refused with 451 twice per message, `reject@` with 550 (its copies end as dead letters),
`drop@` loses its first connection after DATA. A forged header names `mallory@evil.example` and `carol@`,
neither of whom may ever receive a catch-all message they are forged into.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DOMAIN = "example.com"
USERS = ("alice", "bob", "carol", "defer", "drop", "reject", "postmaster")
POSTMASTER = f"postmaster@{DOMAIN}"
TRUSTED_HOST = "mx.isp.example.net"
# mailbox id -> recipient (single-user) or None (catch-all); a mailbox's share of the mail
SINGLE_USER_BOXES = {
    "single-alice": f"alice@{DOMAIN}",
    "single-defer": f"defer@{DOMAIN}",
    "single-drop": f"drop@{DOMAIN}",
    "single-reject": f"reject@{DOMAIN}",
}
CATCH_ALL_BOXES = ("catchall-1", "catchall-2")
MAILBOXES = (*SINGLE_USER_BOXES, *CATCH_ALL_BOXES)
# Where mail goes: weights of (mailbox, kind). The 550 recipient gets a small share.
_KINDS = (
    ("single-alice", "single", 12), ("single-defer", "single", 6), ("single-drop", "single", 5),
    ("single-reject", "single", 3), ("catchall", "envelope", 30), ("catchall", "isp-copies", 20),
    ("catchall", "fallback-twice", 12), ("catchall", "unknown-user", 4),
)  # fmt: skip
_ENVELOPE_USERS = ("alice", "bob", "defer", "drop", "alice", "bob", "reject")


@dataclass(frozen=True, kw_only=True)
class Planned:
    """One logical message: the POP3 copies it arrives as (mailbox id, bytes) and who must receive it."""

    token: str
    kind: str
    copies: tuple[tuple[str, bytes], ...]
    recipients: frozenset[str]


def token_for(run: str, number: int) -> str:
    """Tokens match tests.support.scripted_smtp.TOKEN: `ctk-<hex run id>-<number>`."""
    return f"ctk-{run}-{number:06d}"


def generate(seed: int, count: int) -> list[Planned]:
    """`count` messages, the same ones for the same seed."""
    rng = random.Random(seed)
    run = f"{seed & 0xFFFFFFFF:x}"
    choices = [(box, kind) for box, kind, _ in _KINDS]
    weights = [weight for _, _, weight in _KINDS]
    return [_one(rng, token_for(run, n), *rng.choices(choices, weights)[0]) for n in range(count)]


def _one(rng: random.Random, token: str, box: str, kind: str) -> Planned:
    body = _body(rng, token)
    if kind == "single":
        raw = _message(token, body, [], to=f"someone@{DOMAIN}")
        return Planned(
            token=token, kind=kind, copies=((box, raw),), recipients=frozenset({SINGLE_USER_BOXES[box]})
        )
    catch_all = rng.choice(CATCH_ALL_BOXES)
    if kind == "envelope":
        user = f"{rng.choice(_ENVELOPE_USERS)}@{DOMAIN}"
        raw = _message(token, body, _trusted(user), to="list@outside.example")
        return Planned(token=token, kind=kind, copies=((catch_all, raw),), recipients=frozenset({user}))
    if kind == "isp-copies":
        users = [
            f"{u}@{DOMAIN}" for u in rng.sample(("alice", "bob", "carol", "defer", "drop"), rng.randint(2, 3))
        ]
        copies = tuple((catch_all, _message(token, body, _trusted(u), to=", ".join(users))) for u in users)
        return Planned(token=token, kind=kind, copies=copies, recipients=frozenset(users))
    if kind == "fallback-twice":
        raw = _message(token, body, [], to=f"alice@{DOMAIN}", cc=f"bob@{DOMAIN}")
        return Planned(
            token=token,
            kind=kind,
            copies=((catch_all, raw), (catch_all, raw)),
            recipients=frozenset({f"alice@{DOMAIN}", f"bob@{DOMAIN}"}),
        )
    raw = _message(token, body, _trusted(f"nobody-{rng.randrange(100)}@{DOMAIN}"), to="x@outside.example")
    return Planned(token=token, kind=kind, copies=((catch_all, raw),), recipients=frozenset({POSTMASTER}))


def _trusted(recipient: str) -> list[str]:
    """The fields the ISP adds on top: Delivered-To, then its own Received naming the recipient."""
    return [
        f"Delivered-To: {recipient}",
        f"Received: from out.sender.example (out.sender.example [192.0.2.7])\r\n"
        f"\tby {TRUSTED_HOST} (Postfix) with ESMTPS id 4Xyz\r\n"
        f"\tfor <{recipient}>; Mon, 07 Dec 2026 00:00:00 +0000 (UTC)",
    ]


def _message(token: str, body: bytes, trusted: list[str], *, to: str, cc: str | None = None) -> bytes:
    fields = [
        f"Return-Path: <bounce-{token}@sender.example>",
        *trusted,
        # Forged by the sender, below the trusted hop: never a recipient.
        "Delivered-To: mallory@evil.example",
        f"X-Original-To: carol@{DOMAIN}",
        "From: Sender <news@sender.example>",
        f"To: {to}",
        *([f"Cc: {cc}"] if cc else []),
        f"Subject: chaos {token}",
        f"Message-ID: <{token}@sender.example>",
        "Date: Mon, 07 Dec 2026 00:00:00 +0000",
    ]
    return ("\r\n".join(fields) + "\r\n\r\n").encode() + body


def _body(rng: random.Random, token: str) -> bytes:
    size = (
        rng.choice((800, 2_000, 2_000, 6_000, 20_000))
        if rng.random() > 0.04
        else rng.choice((200_000, 900_000))
    )
    line = f"{token} " + "".join(rng.choice("abcdefghij klmnop") for _ in range(66)) + "\r\n"
    return (f"token {token}\r\n" + line * (size // len(line) + 1)).encode()
