"""services.router.app: an agent's output is durable before the agent moves on (send_durably)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.router.app import SEND_RETRY_DELAYS, send_durably


class FlakyTopic:
    """A faust topic whose first `failures` deliveries fail, as a send does when the broker is away.

    Like faust's, `send` only queues the record and returns the delivery future."""

    def __init__(self, failures: int, *, fail_on_queue: bool = False) -> None:
        self.failures = failures
        self.fail_on_queue = fail_on_queue
        self.attempts = 0
        self.delivered: list[tuple[bytes, bytes]] = []

    def get_topic_name(self) -> str:
        return "popbridge.mail.routed"

    async def send(self, *, key: bytes, value: bytes) -> asyncio.Future[None]:
        self.attempts += 1
        failing = self.attempts <= self.failures
        if failing and self.fail_on_queue:
            raise ConnectionError("cannot queue")
        delivery: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if failing:
            delivery.set_exception(TimeoutError("delivery timed out"))
        else:
            self.delivered.append((key, value))
            delivery.set_result(None)
        return delivery


class Sleeps(list[float]):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.mark.parametrize("fail_on_queue", [False, True], ids=["delivery-fails", "queueing-fails"])
async def test_a_failed_send_is_tried_again_until_the_broker_has_it(fail_on_queue: bool) -> None:
    topic, sleeps = FlakyTopic(3, fail_on_queue=fail_on_queue), Sleeps()

    await send_durably(topic, b"k", b"v", sleep=sleeps)

    assert topic.delivered == [(b"k", b"v")]
    assert sleeps == list(SEND_RETRY_DELAYS[:3])


async def test_a_send_that_fails_for_long_logs_about_one_line_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic, sleeps = FlakyTopic(60), Sleeps()
    caplog.set_level(logging.INFO, "popbridge.router")

    await send_durably(topic, b"k", b"v", sleep=sleeps)

    assert topic.delivered == [(b"k", b"v")]
    minutes = sum(sleeps) / 60
    assert minutes > 9
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) <= 2 + minutes + 1
    assert caplog.records[-1].getMessage() == "sent to popbridge.mail.routed after 60 failed tries"
