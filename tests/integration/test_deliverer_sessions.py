"""The SMTP transport's session pool against a real aiosmtpd server: parallel sessions, each pair once."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from services.deliverer.smtp import SmtpTransport
from tests.support.deliverer import smtp_target
from tests.support.smtp import serve_smtp, smtp_protocol

pytestmark = pytest.mark.integration

SENDER = "bob@remote.example"
WAIT = 20.0  # seconds a session waits in DATA for the others to arrive; only a broken pool reaches it


class Gate:
    """Holds every DATA until `width` sessions are in DATA at once, then lets all through.

    So a pool that sends one message at a time never opens the gate (and the test fails on WAIT), and
    the peak tells whether the pool ever ran more sessions than it may."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.inside = 0
        self.peak = 0
        self.sessions: set[int] = set()
        self.pairs: Counter[tuple[bytes, str]] = Counter()
        self._open = asyncio.Event()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.sessions.add(id(session))
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        if self.inside >= self.width:
            self._open.set()
        try:
            await asyncio.wait_for(self._open.wait(), WAIT)
        finally:
            self.inside -= 1
        subject = (envelope.original_content or b"").split(b"\r\n", 1)[0]
        for rcpt in envelope.rcpt_tos:
            self.pairs[(subject, rcpt)] += 1
        return "250 2.0.0 queued"


def message(index: int) -> bytes:
    return f"Subject: {index}\r\nFrom: {SENDER}\r\n\r\nbody {index}\r\n".encode()


async def test_parallel_sessions_deliver_every_pair_once_and_never_more_sessions_than_allowed() -> None:
    gate = Gate(width=4)
    recipients = ["alice@example.com", "bob@example.com"]
    with serve_smtp(smtp_protocol(gate, hostname="mx.test")) as port:
        async with SmtpTransport(smtp_target(port, connections=4, timeout=60.0)) as transport:
            verdicts = await asyncio.gather(
                *(transport.deliver(SENDER, recipients, message(i)) for i in range(40))
            )
    assert all(v.outcome == "delivered" for verdict in verdicts for v in verdict.values())
    expected = {(f"Subject: {i}".encode(), r) for i in range(40) for r in recipients}
    assert set(gate.pairs) == expected
    assert set(gate.pairs.values()) == {1}
    assert gate.peak == 4
    assert len(gate.sessions) == 4  # reused, never reopened per message
