"""The end-to-end bench's mail: deterministic mailboxes whose true recipients are known, and the scoring.

Sizes: 70 % 2-10 KB, 25 % 50-300 KB, 5 % 1-5 MB (the same mix as bench/deliver.py), by seed. Every message
carries `Message-ID: <e2e-SEED-INDEX@bench.example>`, which is how the sinks tell the copies apart.

The catch-all mailbox mixes the ways a catch-all message tells who it is for (ROUTING.md section 4):
60 % an ISP `Delivered-To`, 10 % Bcc (`Delivered-To` names a local user the To/Cc do not), 10 % several
local recipients in To/Cc and no envelope header, 10 % only a trusted `Received: ... for <...>`, 10 % a
mailing list (`List-Id`) that a list rule sends to one address. The single-drop mailbox's messages are
all for its one owner.
"""

from __future__ import annotations

import base64
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

DOMAIN = "example.com"
OWNER = f"alice@{DOMAIN}"
USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
LIST_ID = "dev.lists.example.org"
LIST_TARGET = f"dev-team@{DOMAIN}"
ISP_HOST = "mx.isp.example"
SENDER = "sender@remote.example"
# The ISP's own hop: envelope headers above it and its `for` clause are trusted (ROUTING.md step 4).
_HOP = f"Received: from relay.remote.example by {ISP_HOST} with ESMTP id abc; Mon, 7 Dec 2026 03:00:00 +0000"
_ID = re.compile(rb"<e2e-\d+-(\d+)@bench\.example>")

Pair = tuple[int, str]
"""(message index, recipient address), lowercase."""


@dataclass(frozen=True)
class Mail:
    """A generated mailbox: the raw messages in order and, per message, its true recipients."""

    messages: list[bytes]
    recipients: list[tuple[str, ...]]
    tag: int = 0

    @property
    def pairs(self) -> set[Pair]:
        first = self.tag * 1_000_000
        return {(first + index, r) for index, rcpts in enumerate(self.recipients) for r in rcpts}

    @property
    def megabytes(self) -> float:
        return sum(len(m) for m in self.messages) / 1e6


def _sizes(rng: random.Random, count: int, small_only: bool) -> list[int]:
    sizes = []
    for _ in range(count):
        draw = 0.0 if small_only else rng.random()
        low, high = (
            (2_000, 10_000) if draw < 0.70 else (50_000, 300_000) if draw < 0.95 else (1_000_000, 5_000_000)
        )
        sizes.append(rng.randint(low, high))
    return sizes


def _body(rng: random.Random, block: bytes, size: int) -> bytes:
    start = rng.randrange(0, len(block) - size)
    body = block[start : start + size]
    return body[body.find(b"\r\n") + 2 :] + b"\r\n"


def _catch_all_headers(rng: random.Random) -> tuple[list[str], tuple[str, ...]]:
    """Header lines (before the common ones) and the true recipients of one catch-all message."""
    users = [f"{u}@{DOMAIN}" for u in rng.sample(USERS, 3)]
    kind = rng.random()
    if kind < 0.60:
        return [f"Delivered-To: {users[0]}", _HOP, f"To: {users[0]}"], (users[0],)
    if kind < 0.70:  # Bcc: the local recipient is in the envelope header only
        return [f"Delivered-To: {users[0]}", _HOP, "To: someone@remote.example"], (users[0],)
    if kind < 0.80:
        return [_HOP, f"To: {users[0]}", f"Cc: {users[1]}, {users[2]}"], tuple(sorted(users))
    if kind < 0.90:
        hop = _HOP.replace(" id abc;", f" id abc\r\n\tfor <{users[0]}>;")
        return [hop, "To: undisclosed-recipients:;"], (users[0],)
    return [_HOP, f"List-Id: Dev <{LIST_ID}>", "To: dev@lists.example.org"], (LIST_TARGET,)


def generate(count: int, seed: int, *, catch_all: bool, small_only: bool = False, tag: int = 0) -> Mail:
    """`count` messages, the same for the same arguments; `tag` keeps Message-IDs of mailboxes apart."""
    rng = random.Random(seed * 1000 + tag)
    block = base64.encodebytes(random.Random(seed).randbytes(4 * 1024 * 1024)).replace(b"\n", b"\r\n")
    messages, recipients = [], []
    for index, size in enumerate(_sizes(rng, count, small_only)):
        number = tag * 1_000_000 + index
        lines, true = _catch_all_headers(rng) if catch_all else ([f"To: {OWNER}"], (OWNER,))
        lines += [
            f"From: Sender <{SENDER}>",
            f"Subject: message {number}",
            f"Message-ID: <e2e-{seed}-{number}@bench.example>",
            "Date: Mon, 7 Dec 2026 03:00:00 +0000",
        ]
        messages.append(("\r\n".join(lines) + "\r\n\r\n").encode() + _body(rng, block, size))
        recipients.append(true)
    return Mail(messages, recipients, tag)


def message_index(header_bytes: bytes) -> int | None:
    """The index (tag * 1e6 + index) named by the first bench Message-ID in `header_bytes`."""
    found = _ID.search(header_bytes)
    return None if found is None else int(found.group(1))


@dataclass(frozen=True)
class Score:
    """Which expected pairs arrived (`right` of `expected`), and how many arrived more than once."""

    right: int
    expected: int
    duplicates: int
    wrong: int


def score(received: Iterable[Pair], expected: set[Pair]) -> Score:
    counts = Counter((index, address.lower()) for index, address in received)
    right = sum(1 for pair in expected if counts[pair])
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    wrong = sum(1 for pair in counts if pair not in expected)
    return Score(right=right, expected=len(expected), duplicates=duplicates, wrong=wrong)
