"""Hostile POP3 servers (tests/support/hostile_pop3.py): each costs its own mailbox its turn, never the
process, never another mailbox, never a message.

Two levels. The Fetcher, on the embedded log, against one scripted server per case: endless replies,
trickling bytes, UIDLs that cannot identify a message, LIST claims that lie, -ERR for one message, a log
that refuses one record. `popbridge run` as a child process against the same servers is in
test_hostile_pop3_run.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import codec
from schemas.events import MailFetched
from schemas.topics import FETCH_STATE, FETCHED, TopicSpec, topic_spec
from services.fetcher.commands import open_fetch_memory
from services.fetcher.service import RETR_MARGIN, Fetcher
from services.runtime.embedded import EmbeddedLog
from services.runtime.metrics import Metrics
from services.runtime.settings import ConfigError, DeploymentSettings, Mailbox, load_config
from tests.support.hostile_pop3 import (
    MB,
    PASSWORD,
    PASSWORD_ENV,
    HostilePop3Server,
    Message,
    endless,
    endless_listing,
    mail,
    mailbox,
    reply,
    silence,
    trickle,
)

pytestmark = pytest.mark.integration


@dataclass
class Stage:
    log: EmbeddedLog
    fetcher: Fetcher

    async def published(self) -> list[MailFetched]:
        return [codec.decode(r.value, MailFetched) async for r in self.log.scan(FETCHED)]


@asynccontextmanager
async def stage(
    data_dir: Path, *, fetched_limit: int | None = None, metrics: Metrics | None = None
) -> AsyncIterator[Stage]:
    """A Fetcher on an embedded log in `data_dir`, its memory loaded as at a start."""
    log = EmbeddedLog(data_dir, synchronous="NORMAL")
    fetched = topic_spec(FETCHED)
    if fetched_limit is not None:
        fetched = TopicSpec(
            FETCHED, fetched.partitions, {**fetched.config, "max.message.bytes": str(fetched_limit)}
        )
    await log.ensure_topics([fetched, topic_spec(FETCH_STATE)])
    settings = DeploymentSettings(data_dir=str(data_dir))
    async with open_fetch_memory(log, settings) as memory, log.producer() as producer:
        yield Stage(log, Fetcher(settings=settings, producer=producer, memory=memory,
                                 environ={PASSWORD_ENV: PASSWORD}, metrics=metrics))  # fmt: skip


def digests(contents: Sequence[bytes]) -> set[str]:
    return {hashlib.sha256(c).hexdigest() for c in contents}


# --- Bounded replies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
async def test_an_endless_retr_body_costs_that_message_only(tmp_path: Path, pipelining: bool) -> None:
    good = [Message(mail(1)), Message(mail(2))]
    server = HostilePop3Server([good[0], Message(mail(99), retr=endless()), good[1]], pipelining=pipelining)
    async with server, stage(tmp_path) as s:
        result = await s.fetcher.poll(mailbox(server))
        published = await s.published()
    assert (result.error, result.published, result.deleted, result.too_big) == (None, 2, 2, 1)
    assert {e.sha256 for e in published} == digests([m.content for m in good])
    assert [m.retr for m in server.messages] != [None]  # the endless one is still there, alone
    assert len(server.messages) == 1


@pytest.mark.parametrize("listing", ["uidl_reply", "list_reply"])
async def test_an_endless_listing_ends_that_session_and_deletes_nothing(tmp_path: Path, listing: str) -> None:
    server = HostilePop3Server([Message(mail(1))])
    setattr(server, listing, endless_listing())
    metrics = Metrics(process=False)
    async with server, stage(tmp_path, metrics=metrics) as s:
        result = await s.fetcher.poll(mailbox(server))
    assert result.state == "limit-exceeded"
    assert "larger than" in (result.error or "")
    assert len(server.messages) == 1
    failures = b'popbridge_mailbox_poll_failures_total{mailbox="box",state="limit-exceeded"} 1.0'
    assert failures in metrics.render()


async def test_a_trickling_reply_fails_at_the_command_deadline_though_bytes_keep_coming(
    tmp_path: Path,
) -> None:
    # One byte every 50 ms keeps the 5 s idle timer from ever firing; the 1 s deadline does not care.
    server = HostilePop3Server([Message(mail(1))], uidl_reply=trickle(b"+OK\r\n", 0.05))
    async with server, stage(tmp_path) as s:
        result = await s.fetcher.poll(mailbox(server, command_deadline=1.0))
    assert result.state == "limit-exceeded"
    assert "UIDL took longer than command_deadline (1 s)" in (result.error or "")
    assert len(server.messages) == 1


async def test_a_pass_ends_at_its_deadline_however_each_command_keeps_within_its_own(tmp_path: Path) -> None:
    server = HostilePop3Server([Message(mail(1))], greeting=silence())
    async with server, stage(tmp_path) as s:
        result = await s.fetcher.poll(mailbox(server, timeout=60.0, command_deadline=60.0, pass_deadline=0.5))
    assert result.state == "limit-exceeded"
    assert "the pass took longer than pass_deadline (0.5 s)" in (result.error or "")
    assert len(server.messages) == 1


async def test_a_trickling_retr_skips_that_message_for_the_pass(tmp_path: Path) -> None:
    slow = Message(mail(2), retr=trickle(b"+OK\r\n", 0.05))
    server = HostilePop3Server([Message(mail(1)), slow, Message(mail(3))])
    async with server, stage(tmp_path) as s:
        result = await s.fetcher.poll(mailbox(server, command_deadline=1.0))
    assert (result.error, result.published, result.deleted, result.skipped) == (None, 2, 2, 1)
    assert server.messages == [slow]


# --- Identity ---------------------------------------------------------------------------------------


async def test_two_messages_sharing_a_uidl_are_both_published_and_never_merged(tmp_path: Path) -> None:
    first = mail(1)
    server = HostilePop3Server([Message(first, uidl=b"dup")])
    async with server, stage(tmp_path) as s:
        await s.fetcher.poll(mailbox(server))
        # The UIDL the fetcher remembers as published comes back on two other messages of the same size.
        same_size = [mail(2), mail(3)]
        assert {len(m) for m in same_size} == {len(first)}
        for content in same_size:
            server.add(Message(content, uidl=b"dup"))
        server.add(Message(mail(4), uidl=b"fine"))
        result = await s.fetcher.poll(mailbox(server))
        published = await s.published()
    assert (result.error, result.published, result.deleted) == (None, 3, 3)
    assert {e.sha256 for e in published} == digests(
        [Message(c).content for c in [first, *same_size, mail(4)]]
    )
    assert len({e.fetch_id for e in published}) == 4
    assert server.messages == []


async def test_a_uidl_reused_for_another_message_of_the_same_size_is_published_not_deleted(
    tmp_path: Path,
) -> None:
    first, second = mail(1), mail(2)
    assert len(first) == len(second)
    server = HostilePop3Server([Message(first, uidl=b"same")])
    async with server, stage(tmp_path) as s:
        await s.fetcher.poll(mailbox(server))
        server.add(Message(second, uidl=b"same"))  # RFC 1939 forbids it; servers do it after a deletion
        result = await s.fetcher.poll(mailbox(server))
        published = await s.published()
    assert (result.published, result.deleted) == (1, 1)
    assert {e.sha256 for e in published} == digests([Message(first).content, Message(second).content])


@pytest.mark.parametrize(
    "uidls",
    [[b"abc def", b"abc"], [b"x" * 200_000, b"ok"], [b"caf\xc3\xa9", b"tab\tbed"], [b"", b"y" * 71]],
    ids=["space", "200KB", "non-printable", "empty-and-71-chars"],
)
async def test_a_uidl_outside_rfc_1939_is_identified_by_content(
    tmp_path: Path, uidls: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    messages = [Message(mail(n), uidl=uidl) for n, uidl in enumerate(uidls)]
    server = HostilePop3Server(list(messages))
    async with server, stage(tmp_path) as s:
        result = await s.fetcher.poll(mailbox(server))
        again = await s.fetcher.poll(mailbox(server))
        published = await s.published()
    assert (result.error, result.published, result.deleted, again.published) == (None, 2, 2, 0)
    assert {e.sha256 for e in published} == digests([m.content for m in messages])
    assert server.messages == []
    assert max(len(r.getMessage()) for r in caplog.records) < 1000  # a 200 KB id is never logged
    assert any("without a usable UIDL" in r.getMessage() for r in caplog.records)


async def test_keep_mode_publishes_a_message_without_usable_uidl_once(tmp_path: Path) -> None:
    server = HostilePop3Server([Message(mail(1), uidl=b"a b"), Message(mail(2), uidl=b"a b")])
    async with server, stage(tmp_path) as s:
        first = await s.fetcher.poll(mailbox(server, mode="keep"))
        second = await s.fetcher.poll(mailbox(server, mode="keep"))
        published = await s.published()
    assert (first.published, second.published, len(published), len(server.messages)) == (2, 0, 2, 2)


# --- Sizes ------------------------------------------------------------------------------------------


async def test_a_list_that_under_reports_cannot_bypass_the_size_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    huge = Message(mail(9, 3 * MB), listed_size=1_000)
    slightly = Message(mail(8, MB + RETR_MARGIN // 2), listed_size=1_000)  # read whole, then refused
    server = HostilePop3Server([Message(mail(1)), huge, slightly, Message(mail(2))])
    async with server, stage(tmp_path) as s:
        result = await s.fetcher.poll(mailbox(server))
        again = await s.fetcher.poll(mailbox(server))
        published = await s.published()
    assert (result.error, result.published, result.deleted, result.too_big) == (None, 2, 2, 2)
    assert (again.error, again.published) == (None, 0)
    assert all(e.size <= MB for e in published)
    assert server.messages == [huge, slightly]
    reports = [r for r in caplog.records if "left on the server (too-big)" in r.getMessage()]
    assert len(reports) == 2  # once each, not once per pass


async def test_a_record_the_log_refuses_is_skipped_and_the_rest_of_the_batch_goes(tmp_path: Path) -> None:
    big = Message(mail(5, 300_000))
    server = HostilePop3Server([Message(mail(1)), big, Message(mail(2))])
    async with server, stage(tmp_path, fetched_limit=100_000) as s:
        result = await s.fetcher.poll(mailbox(server))
        published = await s.published()
    assert (result.error, result.published, result.deleted, result.skipped) == (None, 2, 2, 1)
    assert len(published) == 2
    assert server.messages == [big]


def test_a_size_limit_the_fetched_topic_cannot_carry_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "popbridge.toml"
    path.write_text(
        '[delivery]\nhost = "127.0.0.1"\n[routing]\nlocal_domains = ["example.com"]\n'
        '[[mailboxes]]\nid = "a"\nhost = "127.0.0.1"\nusername = "u"\n'
        'password_env = "X"\nrecipients = ["a@example.com"]\nmax_message_size = 100_000_000\n'
    )
    expected = r"popbridge.toml: mailboxes\[0\]: max_message_size: 100000000 must be above 0 and at most"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


# --- Containment ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
async def test_an_err_to_one_retr_skips_that_message_only(tmp_path: Path, pipelining: bool) -> None:
    refused = Message(mail(2), retr=reply(b"-ERR [SYS/PERM] cannot read this one"))
    server = HostilePop3Server([Message(mail(1)), refused, Message(mail(3))], pipelining=pipelining)
    metrics = Metrics(process=False)
    async with server, stage(tmp_path, metrics=metrics) as s:
        result = await s.fetcher.poll(mailbox(server))
    assert (result.error, result.published, result.deleted, result.skipped) == (None, 2, 2, 1)
    assert server.messages == [refused]
    assert b'popbridge_messages_skipped_total{mailbox="box",reason="refused"} 1.0' in metrics.render()


async def test_a_session_full_of_refused_messages_does_not_stop_the_pass_nor_loop(tmp_path: Path) -> None:
    refused = [Message(mail(n), retr=reply(b"-ERR [SYS/PERM] no")) for n in range(3)]
    by_content = Message(mail(3), uidl=b"a b", retr=reply(b"-ERR [SYS/PERM] no"))
    server = HostilePop3Server([*refused, by_content, Message(mail(4)), Message(mail(5))])
    async with server, stage(tmp_path) as s:
        result = await s.fetcher.poll(mailbox(server, quit_every=2))
    assert (result.error, result.published, result.deleted, result.skipped) == (None, 2, 2, 4)
    assert server.messages == [*refused, by_content]


async def test_a_hung_mailbox_does_not_delay_a_healthy_one(tmp_path: Path) -> None:
    hung = HostilePop3Server([Message(mail(1))], greeting=silence())
    healthy = HostilePop3Server([Message(mail(2)), Message(mail(3))])
    async with hung, healthy, stage(tmp_path) as s:
        passes = asyncio.ensure_future(
            s.fetcher.poll_all(
                [mailbox(hung, "hung", timeout=60.0, command_deadline=60.0), mailbox(healthy, "ok")]
            )
        )
        await healthy.wait_for(lambda server: not server.messages and server.open_sessions == 0)
        assert hung.open_sessions == 1  # the healthy pass did not wait for it
        assert not passes.done()
        passes.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await passes
    assert len(hung.messages) == 1


async def test_a_port_out_of_range_or_a_tls_failure_fails_its_mailbox_only(tmp_path: Path) -> None:
    healthy = HostilePop3Server([Message(mail(1))])
    async with healthy, stage(tmp_path) as s:
        broken = mailbox(healthy, "broken")
        msgspec.structs.force_setattr(broken, "port", 70000)  # as if the configuration had let it through
        tls = mailbox(healthy, "tls", tls="implicit")  # a TLS handshake with a plain-text server
        broken_result, tls_result, ok_result = await s.fetcher.poll_all([broken, tls, mailbox(healthy, "ok")])
    assert tls_result.state == "tls-failed"
    assert broken_result.state == "config-error"
    assert "mailboxes[broken]: cannot connect to host '127.0.0.1' port 70000" in (broken_result.error or "")
    assert (ok_result.error, ok_result.published) == (None, 1)


async def test_a_bug_in_one_pass_is_contained_to_its_mailbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthy = HostilePop3Server([Message(mail(1))])
    async with healthy, stage(tmp_path) as s:
        real = s.fetcher._plan

        def buggy(box: Mailbox, *args: Any) -> Any:
            if box.id == "buggy":
                raise ZeroDivisionError("a bug of ours")
            return real(box, *args)

        monkeypatch.setattr(s.fetcher, "_plan", buggy)
        buggy_result, ok_result = await s.fetcher.poll_all(
            [mailbox(healthy, "buggy"), mailbox(healthy, "ok")]
        )
    assert (buggy_result.state, buggy_result.error) == ("internal-error", "ZeroDivisionError: a bug of ours")
    assert (ok_result.error, ok_result.published) == (None, 1)


# --- Property: whatever the listing, every message is durable on the log or still on the server ----------

Arrival = tuple[bytes, bytes | None, int | None, bool]  # content, listed UIDL, LIST's claim, -ERR to RETR
UIDLS = st.sampled_from([b"a", b"b", b"c", b"a b", b"", b"x" * 71, b"\xff\xfe", b"tab\tbed", None])
CONTENTS = st.sampled_from([mail(n) for n in range(4)] + [mail(9, 6_000)])  # the last is over the limit
ARRIVALS = st.lists(
    st.tuples(CONTENTS, UIDLS, st.sampled_from([None, 0, 10**9]), st.booleans()), min_size=0, max_size=5
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rounds=st.lists(ARRIVALS, min_size=1, max_size=3), mode=st.sampled_from(["delete", "keep"]),
    pipelining=st.booleans(),
)  # fmt: skip
def test_every_message_ends_durable_or_still_on_the_server(
    tmp_path_factory: pytest.TempPathFactory, rounds: list[list[Arrival]], mode: str, pipelining: bool
) -> None:
    """Mail arrives in rounds (shared, malformed, reused UIDLs, LIST lies, -ERR to RETR), a pass each."""
    asyncio.run(_passes(tmp_path_factory.mktemp("log"), rounds, mode, pipelining))


async def _passes(data_dir: Path, rounds: list[list[Arrival]], mode: str, pipelining: bool) -> None:
    ever: list[Message] = []
    server = HostilePop3Server([], pipelining=pipelining)
    async with server, stage(data_dir) as s:
        box = mailbox(server, mode=mode, max_message_size=5_000)
        for arrivals in rounds:
            for content, uidl, listed_size, refused in arrivals:
                retr = reply(b"-ERR [SYS/PERM] no") if refused else None
                serial = f"X-Serial: {len(ever)}\r\n".encode()  # every arrival a different message
                message = Message(serial + content, uidl=uidl, listed_size=listed_size, retr=retr)
                server.add(message)
                ever.append(message)
            result = await s.fetcher.poll(box)
            assert result.state == "ok", result.error
            published = await s.published()
            durable = {e.sha256 for e in published}
            still_there = {id(m) for m in server.messages}
            lost = [
                m
                for m in ever
                if hashlib.sha256(m.content).hexdigest() not in durable and id(m) not in still_there
            ]
            assert not lost, f"lost: {[(m.uidl, len(m.content)) for m in lost]}"
            ids: dict[str, set[str]] = {}
            for event in published:
                ids.setdefault(event.fetch_id, set()).add(event.sha256)
            assert all(len(digests) == 1 for digests in ids.values())  # a fetch id never merges two messages
