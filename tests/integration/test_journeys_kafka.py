"""Journeys through the real parts: Dovecot -> fetcher -> Kafka -> router (faust) -> deliverer -> SMTP."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tests.support.dovecot import DovecotMailboxes
from tests.support.mail import canonical_pop3_form
from tests.support.mail_config import delivery_to, mailbox, write_mail_config
from tests.support.parts import CORPUS, missing_part
from tests.support.pipeline import Pipeline, without_trace_field
from tests.support.smtp import SmtpSink

pytestmark = pytest.mark.integration


ROUTING = {
    "primary_domain": "example.com",
    "local_domains": ["example.com"],
    "alias_domains": {"example.org": "example.com"},
    "users": ["alice", "bob", "carol", "postmaster"],
    "postmaster": "postmaster@example.com",
    "trusted_received_hosts": ["mx.isp.example.net"],
}


def describe_difference(got: bytes, want: bytes) -> str:
    at = next(
        (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want))
    )
    around = slice(max(at - 20, 0), at + 20)
    return f"{len(got)} vs {len(want)} bytes, first difference at {at}: {got[around]!r} vs {want[around]!r}"


def corpus_messages() -> list[bytes]:
    if not CORPUS.is_dir():
        missing_part(f"the public corpus is not beside this checkout ({CORPUS})")
    return [p.read_bytes() for p in sorted(CORPUS.rglob("*")) if p.is_file()]


def generated_messages(count: int, seed: int = 7) -> list[bytes]:
    """Mixed sizes: mostly a few KB, some hundreds of KB, a few MB, like real mailboxes."""
    rng = random.Random(seed)
    messages = []
    for i in range(count):
        size = rng.choice([2_000, 8_000, 60_000, 250_000, 1_500_000])
        line = (f"line {i} " + "x" * 60 + "\r\n").encode()
        body = line * (size // len(line) + 1)
        messages.append(f"Subject: generated {i}\r\nMessage-ID: <g{i}@test>\r\n\r\n".encode() + body)
    return messages


def single_user_mailbox(dovecot: DovecotMailboxes, login: str, **extra: Any) -> dict[str, Any]:
    return mailbox("alice-box", dovecot.server.host, dovecot.server.pop3_port, login,
                   password_env="ALICE_POP3_PASSWORD", **extra)


async def test_single_user_mailbox_arrives_byte_identical_and_is_emptied(
    kafka_bootstrap: str,
    kafka_topic_prefix: str,
    dovecot: DovecotMailboxes,
    smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    user = dovecot.new_user("alice")
    originals = corpus_messages() + generated_messages(27)
    assert len(originals) >= 200
    dovecot.deliver_many(user, originals)
    config = write_mail_config(tmp_path / "popbridge.toml", delivery=delivery_to(smtp_sink.port),
                               mailboxes=[single_user_mailbox(dovecot, user.login)])
    pipeline = Pipeline(kafka_bootstrap, kafka_topic_prefix, config, {"ALICE_POP3_PASSWORD": user.password})
    await pipeline.create_topics()

    results = await pipeline.run_once()

    assert [(r.published, r.error) for r in results] == [(len(originals), None)]
    assert dovecot.message_count(user) == 0
    received = sorted(without_trace_field(m.content) for m in smtp_sink.messages)
    expected = sorted(canonical_pop3_form(o) for o in originals)
    assert len(received) == len(expected)
    assert [describe_difference(r, e) for r, e in zip(received, expected, strict=True) if r != e] == []
    assert {m.rcpt_tos for m in smtp_sink.messages} == {("alice@example.com",)}


BCC_COPY = (
    b"Delivered-To: bob@example.com\r\n"
    b"Received: from out.sender.example (out.sender.example [192.0.2.7])\r\n"
    b"\tby mx.isp.example.net (Postfix) with ESMTPS id 4Xyz\r\n"
    b"\tfor <bob@example.com>; Fri, 27 Nov 2026 08:00:00 +0000 (UTC)\r\n"
    b"Delivered-To: mallory@evil.example\r\n"  # forged by the sender, below the trusted hop
    b"Return-Path: <news@sender.example>\r\n"
    b"From: Sender <news@sender.example>\r\n"
    b"To: Someone Outside <someone@outside.example>\r\n"
    b"Cc: carol@example.com\r\n"
    b"Subject: you were Bcc'd\r\n"
    b"Message-ID: <bcc-1@sender.example>\r\n"
    b"\r\n"
    b"Only Bob was on the envelope.\r\n"
)


async def test_bcc_recipient_named_only_in_delivered_to_gets_the_message(
    kafka_bootstrap: str,
    kafka_topic_prefix: str,
    dovecot: DovecotMailboxes,
    smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    user = dovecot.new_user("catchall")
    dovecot.deliver(user, BCC_COPY)
    catchall = mailbox("catchall", dovecot.server.host, dovecot.server.pop3_port, user.login, (),
                       password_env="CATCHALL_PASSWORD")
    config = write_mail_config(tmp_path / "popbridge.toml", delivery=delivery_to(smtp_sink.port),
                               routing=ROUTING, mailboxes=[catchall])
    pipeline = Pipeline(kafka_bootstrap, kafka_topic_prefix, config, {"CATCHALL_PASSWORD": user.password})
    await pipeline.create_topics()

    await pipeline.run_once()

    assert [m.rcpt_tos for m in smtp_sink.messages] == [("bob@example.com",)]
    assert without_trace_field(smtp_sink.messages[0].content) == BCC_COPY
    every_recipient = {r for m in smtp_sink.messages for r in m.rcpt_tos} | {
        r.address for r in smtp_sink.refused_recipients
    }
    assert all(r.endswith("@example.com") for r in every_recipient)


async def test_keep_mode_second_pass_publishes_nothing_new(
    kafka_bootstrap: str,
    kafka_topic_prefix: str,
    dovecot: DovecotMailboxes,
    smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    user = dovecot.new_user("keeper")
    dovecot.deliver_many(user, generated_messages(5, seed=3))
    config = write_mail_config(tmp_path / "popbridge.toml", delivery=delivery_to(smtp_sink.port),
                               mailboxes=[single_user_mailbox(dovecot, user.login, mode="keep")])
    environ = {"ALICE_POP3_PASSWORD": user.password}
    first = Pipeline(kafka_bootstrap, kafka_topic_prefix, config, environ)
    await first.create_topics()
    assert [r.published for r in await first.fetch()] == [5]

    # A new fetcher process: its memory comes back from the fetch-state topic.
    second = Pipeline(kafka_bootstrap, kafka_topic_prefix, config, environ)
    assert [(r.published, r.error) for r in await second.fetch()] == [(0, None)]
    assert dovecot.message_count(user) == 5

    dovecot.deliver(user, b"Subject: one more\r\n\r\nnew\r\n")
    assert [r.published for r in await second.fetch()] == [1]
