"""services/fetcher/commands.py: a pass the broker could not take is run again once the broker is back."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from services.fetcher import commands
from services.fetcher.commands import poll_forever
from services.fetcher.service import Fetcher, PassResult
from services.runtime.settings import Mailbox


class Passes:
    """A fetcher whose first pass fails to publish (the broker away) and whose later passes succeed."""

    def __init__(self) -> None:
        self.results = [PassResult("box", error="kafka: publish: KafkaTimeoutError", state="publish-failed")]
        self.polled = 0
        self.first, self.second = asyncio.Event(), asyncio.Event()

    async def poll(self, mailbox: Mailbox) -> PassResult:
        self.polled += 1
        (self.first if self.polled == 1 else self.second).set()
        return self.results.pop(0) if self.results else PassResult(mailbox.id)


async def test_a_pass_the_broker_refused_runs_again_as_soon_as_the_broker_is_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The chaos runs: the first delivery after a broker restart came 61-62 s after the broker was ready,
    # the mailbox's POP3 backoff (30-60 s with the default 60 s interval) applied to a Kafka failure.
    monkeypatch.setattr(commands, "FIRST_POLL_SPREAD", 0.0)
    fetcher = Passes()
    waiting, broker_is_back = asyncio.Event(), asyncio.Event()

    async def broker_back() -> None:
        waiting.set()
        await broker_is_back.wait()

    box = Mailbox(id="box", host="127.0.0.1", username="u", poll_interval=3600.0)
    polling = asyncio.create_task(poll_forever(cast(Fetcher, fetcher), box, broker_back=broker_back))
    try:
        await asyncio.wait_for(waiting.wait(), 5)  # after the refused pass it waits for the broker
        assert fetcher.polled == 1
        broker_is_back.set()
        await asyncio.wait_for(fetcher.second.wait(), 5)
    finally:
        polling.cancel()
        await asyncio.gather(polling, return_exceptions=True)
