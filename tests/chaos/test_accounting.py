"""The chaos suite's accounting: every message classified from observations, every duplicate explained."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chaos.accounting import Copy, Kill, Observations, SmtpSession, account, percentiles
from tests.chaos.observe import journal_copies

A, B = "alice@example.com", "bob@example.com"
CLIENT = 4242


def copy(
    token: str = "t1", recipient: str = A, *, at: float = 100.0, session: str = "s1", **extra: Any
) -> Copy:
    return Copy(token=token, recipient=recipient, session=session, at=at, **{"fetch_id": "f1", **extra})


def observe(
    *copies: Copy,
    expected: dict[str, frozenset[str]] | None = None,
    sessions: dict[str, SmtpSession] | None = None,
    **extra: Any,
) -> Observations:
    if sessions is None:
        sessions = {c.session: SmtpSession(client_pid=CLIENT, ended_at=c.at + 5, quit=True) for c in copies}
    return Observations(
        expected=expected or {"t1": frozenset({A})}, copies=copies, sessions=sessions, **extra
    )


def test_a_pair_with_a_copy_is_delivered_and_its_latency_counts_from_the_first_fetch() -> None:
    result = account(observe(copy(at=130.0), fetched_at={"t1": 100.0}))

    assert result.totals["delivered"] == 1
    assert result.latencies == (30.0,)
    assert result.duplicates == ()
    assert result.misrouted == ()


@pytest.mark.parametrize(
    ("extra", "outcome"),
    [
        ({"dead_letters": {("t1", A): "rejected: 550"}}, "dead-lettered"),
        ({"retrying": frozenset({("t1", A)})}, "retrying"),
        ({"stuck": frozenset({"t1"})}, "stuck"),
        ({"on_pop3": frozenset({"t1"})}, "on-pop3"),
        ({}, "lost"),
        # A dead letter for another recipient of the same message does not account for this one.
        ({"dead_letters": {("t1", B): "rejected: 550"}}, "lost"),
    ],
)
def test_a_pair_without_a_copy_is_classified_by_where_it_was_last_seen(
    extra: dict[str, Any], outcome: str
) -> None:
    result = account(observe(**extra))

    assert result.outcomes == {("t1", A): outcome}


def test_each_recipient_of_a_message_is_its_own_pair() -> None:
    seen = observe(copy(recipient=B), expected={"t1": frozenset({A, B})}, dead_letters={("t1", A): "550"})

    result = account(seen)

    assert result.outcomes == {("t1", A): "dead-lettered", ("t1", B): "delivered"}
    assert result.dead_letter_reasons == {"550": 1}


def test_a_copy_to_someone_the_message_must_not_reach_is_misrouted() -> None:
    forged = copy(recipient="mallory@evil.example")

    result = account(observe(copy(), forged))

    assert result.misrouted == (forged,)


def test_a_copy_of_an_unknown_token_is_misrouted() -> None:
    assert len(account(observe(copy(token="other"))).misrouted) == 1


def test_a_duplicate_after_a_scripted_drop_is_explained() -> None:
    first = copy(at=100.0, session="s1", dropped=True)
    sessions = {
        "s1": SmtpSession(client_pid=CLIENT, ended_at=100.0),
        "s2": SmtpSession(client_pid=CLIENT, ended_at=None),
    }

    result = account(observe(first, copy(at=110.0, session="s2"), sessions=sessions))

    assert [(d.copies, d.causes, d.explained) for d in result.duplicates] == [(2, ("scripted-drop",), True)]


def test_a_duplicate_after_the_client_was_killed_before_answering_the_reply_is_explained() -> None:
    sessions = {
        "s1": SmtpSession(client_pid=CLIENT, ended_at=100.4),
        "s2": SmtpSession(client_pid=7, ended_at=None),
    }
    kill = Kill(at=100.3, role="deliverer", pid=CLIENT, signal="SIGKILL")

    result = account(observe(copy(at=100.0), copy(at=120.0, session="s2"), sessions=sessions, kills=(kill,)))

    (duplicate,) = result.duplicates
    assert duplicate.explained
    assert duplicate.causes[0].startswith("client-killed: deliverer pid 4242 SIGKILL 0.3s")


def test_a_kill_of_another_process_does_not_explain_a_duplicate() -> None:
    sessions = {
        "s1": SmtpSession(client_pid=CLIENT, ended_at=100.4),
        "s2": SmtpSession(client_pid=7, ended_at=None),
    }
    kill = Kill(at=100.3, role="deliverer", pid=999, signal="SIGKILL")

    result = account(observe(copy(at=100.0), copy(at=120.0, session="s2"), sessions=sessions, kills=(kill,)))

    assert not result.duplicates[0].explained
    assert "broke without a kill" in result.duplicates[0].causes[0]


def test_a_duplicate_after_the_smtp_server_was_killed_mid_session_is_explained() -> None:
    sessions = {
        "s1": SmtpSession(client_pid=CLIENT, ended_at=None),
        "s2": SmtpSession(client_pid=CLIENT, ended_at=None),
    }
    kill = Kill(at=100.1, role="smtp", pid=1, signal="SIGKILL")

    result = account(observe(copy(at=100.0), copy(at=130.0, session="s2"), sessions=sessions, kills=(kill,)))

    assert result.duplicates[0].causes[0].startswith("smtp-killed")


LEDGER_SESSIONS = {
    "s1": SmtpSession(client_pid=CLIENT, ended_at=100.1, quit=True),
    "s2": SmtpSession(client_pid=7, ended_at=None),
}


def test_a_duplicate_after_the_client_was_killed_between_the_250_and_its_ledger_record_is_explained() -> None:
    # The 250 went out at 100.05 and the client even sent QUIT, but the harness SIGKILLed it before the
    # pair's ledger record was written: the next owner saw no record and sent the copy again (its own
    # record came at 121).
    first = copy(at=100.0, acked=True, replied_at=100.05)
    kill = Kill(at=100.07, role="deliverer", pid=CLIENT, signal="SIGKILL")

    result = account(
        observe(first, copy(at=120.0, session="s2"), sessions=LEDGER_SESSIONS, kills=(kill,),
                ledger={("f1", A): 121.0})
    )  # fmt: skip

    (duplicate,) = result.duplicates
    assert duplicate.explained
    assert duplicate.causes[0].startswith("ledger-window: deliverer pid 4242 SIGKILL 0.02s after the 250")


@pytest.mark.parametrize(
    ("kill", "ledger"),
    [
        # The ledger record existed before the kill: the next owner should have seen it.
        (Kill(at=100.07, role="deliverer", pid=CLIENT, signal="SIGKILL"), {("f1", A): 100.06}),
        # The kill came long after the 250: the deliverer had all the time to record the copy.
        (Kill(at=130.0, role="deliverer", pid=CLIENT, signal="SIGKILL"), {}),
        # Another process was killed, not the one holding the session.
        (Kill(at=100.07, role="deliverer", pid=999, signal="SIGKILL"), {}),
        # A SIGTERM'd deliverer records what it sent before it exits.
        (Kill(at=100.07, role="deliverer", pid=CLIENT, signal="SIGTERM"), {}),
    ],
    ids=["ledger-before-kill", "kill-long-after", "other-process", "sigterm"],
)
def test_a_kill_after_the_250_does_not_explain_a_duplicate_the_ledger_could_have_prevented(
    kill: Kill, ledger: dict[tuple[str, str], float]
) -> None:
    first = copy(at=100.0, acked=True, replied_at=100.05)

    result = account(
        observe(first, copy(at=140.0, session="s2"), sessions=LEDGER_SESSIONS, kills=(kill,), ledger=ledger)
    )

    (duplicate,) = result.duplicates
    assert not duplicate.explained
    assert "answered the 250" in duplicate.causes[0]


@pytest.mark.parametrize(
    ("first", "session", "why"),
    [
        # The client answered the 250: the deliverer knew the copy was delivered and sent it again.
        ({"acked": True}, SmtpSession(client_pid=CLIENT, ended_at=None), "answered the 250"),
        ({}, SmtpSession(client_pid=CLIENT, ended_at=101.0, quit=True), "ended with QUIT"),
        # Two POP3 copies of one message both routed to the recipient: the dedupe let one through.
        ({"fetch_id": "f0"}, SmtpSession(client_pid=CLIENT, ended_at=None), "two POP3 copies"),
    ],
)
def test_other_duplicates_are_unexplained(first: dict[str, Any], session: SmtpSession, why: str) -> None:
    kill = Kill(at=100.2, role="deliverer", pid=CLIENT, signal="SIGKILL")
    sessions = {"s1": session, "s2": SmtpSession(client_pid=7, ended_at=None)}

    result = account(
        observe(copy(at=100.0, **first), copy(at=120.0, session="s2"), sessions=sessions, kills=(kill,))
    )

    (duplicate,) = result.duplicates
    assert not duplicate.explained
    assert why in duplicate.causes[0]


def test_an_unexplained_duplicate_says_how_the_client_that_sent_the_copy_ended() -> None:
    sessions = {
        "s1": SmtpSession(client_pid=CLIENT, ended_at=None),
        "s2": SmtpSession(client_pid=7, ended_at=None),
    }
    copies = (copy(at=100.0, acked=True), copy(at=110.0, session="s2"))

    (duplicate,) = account(
        observe(*copies, sessions=sessions, endings={CLIENT: "self-crash (exit 1)"})
    ).duplicates

    assert "pid 4242 answered the 250" in duplicate.causes[0]
    assert "then self-crash (exit 1)" in duplicate.causes[0]


def test_every_extra_copy_needs_its_own_explanation() -> None:
    sessions = {name: SmtpSession(client_pid=CLIENT, ended_at=None) for name in ("s1", "s2", "s3")}
    copies = (
        copy(at=100.0, dropped=True),
        copy(at=110.0, session="s2", acked=True),
        copy(at=120.0, session="s3"),
    )

    (duplicate,) = account(observe(*copies, sessions=sessions)).duplicates

    assert duplicate.copies == 3
    assert duplicate.causes[0] == "scripted-drop"
    assert duplicate.causes[1].startswith("unexplained")


def test_journal_lines_become_one_copy_per_recipient_with_their_session() -> None:
    entries = [
        {"k": "session", "s": "1-1", "t": 1.0, "client_pid": CLIENT},
        {
            "k": "data",
            "s": "1-1",
            "t": 2.0,
            "token": "t1",
            "rcpts": [A, B],
            "fetch_id": "f1",
            "outcome": "accepted",
        },
        {"k": "replied", "s": "1-1", "t": 2.2, "token": "t1"},
        {"k": "acked", "s": "1-1", "t": 2.3, "token": "t1"},
        {
            "k": "data",
            "s": "1-1",
            "t": 3.0,
            "token": "t2",
            "rcpts": [A],
            "fetch_id": "f2",
            "outcome": "dropped",
        },
        {"k": "end", "s": "1-1", "t": 3.1, "quit": False},
        {"k": "session", "s": "1-2", "t": 4.0, "client_pid": None},
    ]

    copies, sessions = journal_copies(entries)

    assert [(c.token, c.recipient, c.acked, c.dropped, c.replied_at) for c in copies] == [
        ("t1", A, True, False, 2.2),
        ("t1", B, True, False, 2.2),
        ("t2", A, False, True, None),
    ]
    assert sessions == {
        "1-1": SmtpSession(client_pid=CLIENT, ended_at=3.1, quit=False),
        "1-2": SmtpSession(client_pid=None, ended_at=None),
    }


def test_percentiles() -> None:
    assert percentiles(float(v) for v in range(1, 101)) == {
        "p50": 50.5,
        "p95": 95.05,
        "p99": 99.01,
        "max": 100.0,
    }
    assert percentiles([]) == {}
    assert percentiles([3.0])["p99"] == 3.0
