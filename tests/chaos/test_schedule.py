"""The chaos run's seeded inputs: the same seed gives the same faults and the same mail."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.chaos import mail
from tests.chaos.schedule import plan_faults


@pytest.mark.parametrize("short", [False, True])
def test_a_seed_gives_one_schedule(short: bool) -> None:
    assert plan_faults(7, 300, 2, short=short) == plan_faults(7, 300, 2, short=short)
    assert plan_faults(7, 300, 2, short=short) != plan_faults(8, 300, 2, short=short)


@pytest.mark.parametrize("seed", range(20))
def test_a_full_schedule_has_every_kind_of_fault_within_the_phase(seed: int) -> None:
    faults = plan_faults(seed, 300, 2)

    kinds = Counter(f.kind for f in faults)
    assert {
        "broker-stop",
        "dovecot-kill",
        "smtp-down",
        "kill-starting",
        "kill-rebalance",
        "kill-mid-smtp",
    } <= set(kinds)
    assert kinds["broker-stop"] == 1
    assert [f.at for f in faults] == sorted(f.at for f in faults)
    assert all(0 < f.at < 300 for f in faults)
    broker = next(f for f in faults if f.kind == "broker-stop")
    assert 20 <= broker.down <= 30
    for fault in faults:
        if fault.kind == "kill-rebalance":
            assert fault.target != fault.second
            assert fault.target.split("-")[0] == fault.second.split("-")[0]


def test_the_short_schedule_is_two_kills_a_mid_smtp_kill_and_a_short_broker_stop() -> None:
    faults = plan_faults(1, 60, 2, short=True)

    assert sorted(f.kind for f in faults) == ["broker-stop", "kill", "kill", "kill-mid-smtp"]
    assert 10 <= next(f.down for f in faults if f.kind == "broker-stop") <= 15


def test_generated_mail_is_reproducible_and_every_token_is_unique() -> None:
    planned = mail.generate(3, 300)

    assert planned == mail.generate(3, 300)
    assert len({m.token for m in planned}) == 300
    assert {m.kind for m in planned} == {"single", "envelope", "isp-copies", "fallback-twice", "unknown-user"}
    for message in planned:
        assert all(message.token.encode() in raw for _, raw in message.copies)
        assert all(r.endswith("@example.com") for r in message.recipients)
        assert all(box in mail.MAILBOXES for box, _ in message.copies)


def test_isp_copies_have_one_copy_per_recipient_and_the_same_body() -> None:
    message = next(m for m in mail.generate(3, 300) if m.kind == "isp-copies")

    bodies = {raw.split(b"\r\n\r\n", 1)[1] for _, raw in message.copies}
    assert len(message.copies) == len(message.recipients)
    assert len(bodies) == 1
