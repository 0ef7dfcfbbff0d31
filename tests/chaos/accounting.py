"""Accounting for every message of a chaos run by its token, from what was observed: a pure function.

Per (token, expected recipient) the outcome is the first that holds of:

    delivered      the SMTP server journaled at least one copy (a copy dropped after DATA counts: the server
                   stored it before the connection broke)
    dead-lettered  a dead-letter record names the pair (with its reason)
    retrying       a retry record names the pair and its tier's group has not committed past it
    stuck          the message waits in Kafka: a fetched / by-message-id / routed record not committed past
    on-pop3        the message is still in its POP3 mailbox
    lost           none of the above: the pipeline dropped it

Besides: a copy to a recipient the message must not reach is `misrouted`; a pair with more than one copy
is a duplicate, and each extra copy is explained by the session that carried the copy before it:

    scripted-drop      the server dropped that session after DATA, by script
    client-killed      the session broke (no QUIT) because its client, a deliverer process, was killed by
                       the harness after DATA, before it answered the 250 reply
    ledger-window      the server sent the 250, then the harness SIGKILLed the deliverer process holding the
                       session before any ledger record of the pair (fetch id, recipient) existed, within
                       LEDGER_WINDOW seconds of the 250: the deliverer cannot know the copy went out
                       (issue 13 item 7, the same at-least-once window as a kill before the reply)
    smtp-killed        the SMTP server itself was killed after DATA, before the client answered
    unexplained        anything else: the client had answered the reply (the deliverer knew), the copies
                       came from different POP3 copies (the router's dedupe let one through twice), or the
                       session broke without a kill
"""

from __future__ import annotations

import itertools
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

OUTCOMES = ("delivered", "dead-lettered", "retrying", "stuck", "on-pop3", "lost")
CLIENT_KILL_SLACK = 1.0  # seconds: a session's end is stamped by the server, a kill by the harness
# Seconds after a 250 within which a kill can still fall before that copy's ledger record: the deliverer
# writes it milliseconds after the reply, or seconds later while the broker is away.
LEDGER_WINDOW = 10.0


@dataclass(frozen=True, kw_only=True)
class Copy:
    """One DATA the SMTP server journaled: which message, to whom, in which session, when."""

    token: str
    recipient: str
    session: str
    at: float
    fetch_id: str = ""
    dropped: bool = False  # the scripted server dropped the connection instead of replying
    acked: bool = False  # the client spoke again after the 250 reply: it knew the copy was delivered
    replied_at: float | None = None  # when the server sent the 250 (None: it never replied)


@dataclass(frozen=True, kw_only=True)
class SmtpSession:
    client_pid: int | None
    ended_at: float | None  # None: the server was killed with the session open
    quit: bool = False


@dataclass(frozen=True, kw_only=True)
class Kill:
    """A signal the harness sent: to a stage process (`pid`), or to the SMTP server (`role` "smtp")."""

    at: float
    role: str
    pid: int | None
    signal: str


@dataclass(frozen=True, kw_only=True)
class Observations:
    """Everything the harness saw, as plain values."""

    expected: Mapping[str, frozenset[str]]  # token -> recipients it must reach (dead letters included)
    copies: tuple[Copy, ...]
    sessions: Mapping[str, SmtpSession]
    kills: tuple[Kill, ...] = ()
    dead_letters: Mapping[tuple[str, str], str] = field(default_factory=dict)  # (token, rcpt) -> reason
    retrying: frozenset[tuple[str, str]] = frozenset()
    stuck: frozenset[str] = frozenset()  # tokens waiting in Kafka
    on_pop3: frozenset[str] = frozenset()
    fetched_at: Mapping[str, float] = field(default_factory=dict)  # token -> first fetch (epoch seconds)
    endings: Mapping[int, str] = field(default_factory=dict)  # pid -> how that process ended, for causes
    # (fetch id, recipient) -> when its first ledger record was written (epoch seconds, the record's time)
    ledger: Mapping[tuple[str, str], float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Duplicate:
    token: str
    recipient: str
    copies: int
    causes: tuple[str, ...]  # one per extra copy
    fetch_ids: tuple[str, ...] = ()  # of each copy, in arrival order: a second fetch id is a dedupe miss

    @property
    def explained(self) -> bool:
        return not any(cause.startswith("unexplained") for cause in self.causes)


@dataclass(frozen=True, kw_only=True)
class Accounting:
    outcomes: Mapping[tuple[str, str], str]  # (token, rcpt) -> one of OUTCOMES
    dead_letter_reasons: Mapping[str, int]
    misrouted: tuple[Copy, ...]
    duplicates: tuple[Duplicate, ...]
    latencies: tuple[float, ...]  # seconds from first fetch to first copy, per delivered pair

    def count(self, outcome: str) -> int:
        return sum(1 for value in self.outcomes.values() if value == outcome)

    @property
    def totals(self) -> dict[str, int]:
        return {outcome: self.count(outcome) for outcome in OUTCOMES}

    def pairs(self, outcome: str) -> list[tuple[str, str]]:
        return sorted(pair for pair, value in self.outcomes.items() if value == outcome)


def account(seen: Observations) -> Accounting:
    """Classify every expected pair, and every copy that was not expected."""
    by_pair: dict[tuple[str, str], list[Copy]] = defaultdict(list)
    for copy in sorted(seen.copies, key=lambda c: c.at):
        by_pair[copy.token, copy.recipient].append(copy)
    outcomes = {
        (token, rcpt): _outcome(seen, token, rcpt, bool(by_pair.get((token, rcpt))))
        for token, recipients in seen.expected.items()
        for rcpt in recipients
    }
    misrouted = tuple(c for c in seen.copies if c.recipient not in seen.expected.get(c.token, frozenset()))
    duplicates = tuple(
        Duplicate(token=token, recipient=rcpt, copies=len(copies), causes=_causes(seen, copies),
                  fetch_ids=tuple(c.fetch_id for c in copies))
        for (token, rcpt), copies in sorted(by_pair.items())
        if len(copies) > 1
    )
    reasons = Counter(
        reason for pair, reason in seen.dead_letters.items() if outcomes.get(pair) == "dead-lettered"
    )
    latencies = tuple(
        copies[0].at - seen.fetched_at[token]
        for (token, _), copies in by_pair.items()
        if token in seen.fetched_at
    )
    return Accounting(
        outcomes=outcomes,
        dead_letter_reasons=dict(reasons),
        misrouted=misrouted,
        duplicates=duplicates,
        latencies=latencies,
    )


def _outcome(seen: Observations, token: str, rcpt: str, delivered: bool) -> str:
    if delivered:
        return "delivered"
    if (token, rcpt) in seen.dead_letters:
        return "dead-lettered"
    if (token, rcpt) in seen.retrying:
        return "retrying"
    if token in seen.stuck:
        return "stuck"
    if token in seen.on_pop3:
        return "on-pop3"
    return "lost"


def _causes(seen: Observations, copies: list[Copy]) -> tuple[str, ...]:
    """Why each copy after the first exists: what happened to the session of the copy before it."""
    return tuple(_cause(seen, before, after) for before, after in itertools.pairwise(copies))


def _cause(seen: Observations, before: Copy, after: Copy) -> str:
    if before.fetch_id and after.fetch_id and before.fetch_id != after.fetch_id:
        return f"unexplained: two POP3 copies ({before.fetch_id[:8]}, {after.fetch_id[:8]}) both routed here"
    if before.dropped:
        return "scripted-drop"
    session = seen.sessions.get(before.session)
    if session is None:
        return f"unexplained: no session record for {before.session}"
    unrecorded = _kill_before_ledger(seen, session, before)
    if unrecorded is not None:
        after_reply = unrecorded.at - (before.replied_at or 0.0)
        return (
            f"ledger-window: {unrecorded.role} pid {unrecorded.pid} {unrecorded.signal} {after_reply:.2f}s "
            "after the 250, before the pair's ledger record"
        )
    if before.acked:
        ended = seen.endings.get(session.client_pid or 0, "")
        return (
            f"unexplained: client pid {session.client_pid} answered the 250 for the copy at "
            f"{before.at:.1f} (session {before.session}){', then ' + ended if ended else ''}; sent again"
        )
    if session.quit:
        return f"unexplained: session {before.session} ended with QUIT"
    killed = _client_kill(seen.kills, session, before.at)
    if killed is not None:
        after_data = killed.at - before.at
        return f"client-killed: {killed.role} pid {killed.pid} {killed.signal} {after_data:.1f}s after DATA"
    smtp = next((k for k in seen.kills if k.role == "smtp" and before.at <= k.at <= after.at), None)
    if smtp is not None and (session.ended_at is None or session.ended_at >= smtp.at - CLIENT_KILL_SLACK):
        return f"smtp-killed: {smtp.at - before.at:.1f}s after DATA"
    ended = seen.endings.get(session.client_pid or 0, "")
    client = f" (its client: {ended})" if ended else ""
    return f"unexplained: session {before.session} broke without a kill{client}"


def _client_kill(kills: Iterable[Kill], session: SmtpSession, data_at: float) -> Kill | None:
    """The kill of this session's client after the DATA, that ended the session (within the slack)."""
    for kill in kills:
        if kill.pid is None or kill.pid != session.client_pid or kill.at < data_at - CLIENT_KILL_SLACK:
            continue
        if (
            session.ended_at is None
            or abs(session.ended_at - kill.at) <= CLIENT_KILL_SLACK
            or (kill.signal == "SIGTERM" and session.ended_at >= kill.at)
        ):
            return kill
    return None


def _kill_before_ledger(seen: Observations, session: SmtpSession, copy: Copy) -> Kill | None:
    """The SIGKILL of this session's client within LEDGER_WINDOW after the copy's 250, when no ledger record
    of the pair existed yet. SIGKILL only: a SIGTERM'd deliverer must record what it sent before it exits."""
    if copy.replied_at is None or not copy.fetch_id or session.client_pid is None:
        return None
    recorded = seen.ledger.get((copy.fetch_id, copy.recipient))
    for kill in seen.kills:
        if (
            kill.pid == session.client_pid
            and kill.signal == "SIGKILL"
            and copy.replied_at <= kill.at <= copy.replied_at + LEDGER_WINDOW
            and (recorded is None or recorded > kill.at)
        ):
            return kill
    return None


def percentiles(values: Iterable[float], points: Iterable[int] = (50, 95, 99)) -> dict[str, float]:
    """p50/p95/p99 and max of `values` (empty dict for no values)."""
    ordered = sorted(values)
    if not ordered:
        return {}
    cuts = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else ordered * 99
    result = {f"p{p}": round(cuts[p - 1], 2) for p in points}
    result["max"] = round(ordered[-1], 2)
    return result
