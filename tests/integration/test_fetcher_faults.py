"""The line to the POP3 server drops mid-session (a fault-injecting proxy on loopback): nothing is lost,
nothing is published twice, and what was published is deleted on the next pass."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.support.dovecot import DovecotMailboxes
from tests.support.faulty_proxy import Fault, FaultyProxy
from tests.support.fetcher import FetcherStage, dovecot_mailbox

pytestmark = pytest.mark.integration


def message(number: int, size: int = 20_000) -> bytes:
    head = f"From: a@example.test\r\nSubject: m{number}\r\nMessage-ID: <m{number}@test>\r\n\r\n".encode()
    line = f"message {number} ".encode().ljust(70, b"x") + b"\r\n"
    return head + line * (size // len(line))


@pytest.fixture
async def stage(kafka_bootstrap: str, kafka_topic_prefix: str) -> FetcherStage:
    stage = FetcherStage(kafka_bootstrap, kafka_topic_prefix)
    await stage.create_topics()
    return stage


@pytest.mark.parametrize("fault", [Fault(after_server_bytes=700_000), Fault(before_client_line=b"QUIT")])
async def test_a_dropped_line_loses_nothing_and_publishes_nothing_twice(
    stage: FetcherStage, dovecot: DovecotMailboxes, fault: Fault
) -> None:
    user = dovecot.new_user()
    originals = [message(n) for n in range(80)]
    dovecot.deliver_many(user, originals)
    async with FaultyProxy(dovecot.server.host, dovecot.server.pop3_port) as proxy:
        proxy.faults.append(fault)
        box = dovecot_mailbox(dovecot, user, port=proxy.port)
        async with stage.fetcher({"PW_box": user.password}) as fetcher:
            first = await fetcher.poll(box)
            assert first.state == "unreachable"
            assert proxy.cuts == 1
            assert dovecot.message_count(user) == 80  # no QUIT reached the server: nothing deleted
            second = await fetcher.poll(box)
    assert second.error is None
    assert first.published + second.published == 80
    assert second.deleted == 80
    assert dovecot.message_count(user) == 0
    published = await stage.published()
    assert Counter(e.fetch_id for e in published).most_common(1)[0][1] == 1
    assert sorted(e.raw for e in published) == sorted(originals)


async def test_a_restarted_fetcher_deletes_what_an_earlier_one_published_without_publishing_again(
    stage: FetcherStage, dovecot: DovecotMailboxes
) -> None:
    user = dovecot.new_user()
    dovecot.deliver_many(user, [message(n, 2_000) for n in range(10)])
    async with FaultyProxy(dovecot.server.host, dovecot.server.pop3_port) as proxy:
        proxy.faults.append(Fault(before_client_line=b"QUIT"))
        box = dovecot_mailbox(dovecot, user, port=proxy.port)
        async with stage.fetcher({"PW_box": user.password}) as fetcher:
            assert (await fetcher.poll(box)).published == 10
        async with stage.fetcher({"PW_box": user.password}) as restarted:  # memory from the log only
            result = await restarted.poll(box)
    assert (result.published, result.deleted) == (0, 10)
    assert len(await stage.published()) == 10
    assert dovecot.message_count(user) == 0
