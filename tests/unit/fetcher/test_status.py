"""services/fetcher/status.py: state changes worth a log line, and the wait before the next poll."""

from __future__ import annotations

import random

from services.fetcher.status import MAX_BACKOFF, Failure, MailboxStates, Timing, next_delay

AUTH = Failure("auth-failed", "pop3 PASS refused: -ERR [AUTH] Authentication failed.")


def test_a_failure_is_reported_once_while_it_repeats_and_the_recovery_once() -> None:
    states = MailboxStates()
    assert states.observe("mb", None) is None
    change = states.observe("mb", AUTH)
    assert change is not None
    assert (
        change.message() == "mailbox mb: auth-failed: pop3 PASS refused: -ERR [AUTH] Authentication failed."
    )
    assert not change.quiet
    assert states.observe("mb", AUTH) is None
    recovered = states.observe("mb", None)
    assert recovered is not None
    assert recovered.recovered
    assert recovered.message() == "mailbox mb: recovered (auth-failed before)"
    assert states.observe("other", None) is None


def test_another_failure_is_a_new_change_and_in_use_is_quiet() -> None:
    states = MailboxStates()
    states.observe("mb", AUTH)
    change = states.observe("mb", Failure("in-use", "[IN-USE] locked", retry_after=60))
    assert change is not None
    assert change.quiet
    assert states.state("mb") == "in-use"


def test_a_broker_outage_is_no_mailbox_state_change_so_each_mailbox_stays_silent() -> None:
    # Seen in the chaos runs: an outage wrote a "publish-failed" line per mailbox, and a "recovered" per
    # mailbox after it; the outage is reported once for the process (services.runtime.outage).
    outage = Failure("publish-failed", "kafka: publish: KafkaConnectionError", outage=True)
    states = MailboxStates()
    states.observe("down", Failure("unreachable", "pop3: connection refused"))
    for mailbox in ("a", "b", "down"):
        assert states.observe(mailbox, outage) is None
    assert [states.state(m) for m in ("a", "b", "down")] == ["ok", "ok", "unreachable"]
    assert states.observe("a", None) is None
    recovered = states.observe("down", None)
    assert recovered is not None
    assert recovered.message() == "mailbox down: recovered (unreachable before)"


def test_a_publish_refused_for_good_is_the_mailbox_s_state_change() -> None:
    states = MailboxStates()
    change = states.observe("a", Failure("publish-failed", "kafka: not authorized"))
    assert change is not None
    assert change.message() == "mailbox a: publish-failed: kafka: not authorized"


def test_the_interval_has_ten_percent_jitter_and_login_delay_is_its_floor() -> None:
    rng = random.Random(1)
    delays = [next_delay(Timing(60), rng) for _ in range(200)]
    assert 54 <= min(delays) < max(delays) <= 66
    assert all(next_delay(Timing(60, login_delay=900), rng) >= 900 for _ in range(50))


def test_failures_back_off_exponentially_with_jitter_up_to_a_cap() -> None:
    rng = random.Random(2)
    for failures in (1, 2, 3, 5):
        delays = [next_delay(Timing(10, failures), rng) for _ in range(100)]
        ceiling = 10 * 2 ** (failures - 1)
        assert ceiling / 2 <= min(delays) < max(delays) <= ceiling
    assert next_delay(Timing(10, 40), rng) <= MAX_BACKOFF


def test_the_servers_retry_after_is_a_floor() -> None:
    rng = random.Random(3)
    assert all(next_delay(Timing(10, 1, retry_after=300), rng) >= 300 for _ in range(50))
