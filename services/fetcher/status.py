"""Per-mailbox health and poll timing: which state a mailbox is in, when that is worth a log line, and
when to poll it next. Pure: the service feeds outcomes in and logs what comes out.

A mailbox is `ok` or in one failure state (`auth-failed`, `tls-failed`, ...). Only a change of state is
logged: ok -> auth-failed logs once, the same failure again stays quiet, and the first good pass after
it logs "recovered". So a wrong password polled every minute writes one line, not 1,440 a day.

A broker outage is not a mailbox's state: a pass that could not publish because the log was out of
reach (`Failure.outage`) leaves the mailbox's state as it was, and the process reports the outage once for
all its mailboxes (services.runtime.outage: the first failure, "still unreachable" once a minute,
"reconnected"), not one line per mailbox as it fails and another as it recovers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final, Literal

State = Literal[
    "ok",
    "auth-failed",  # the server refused the credentials or the method
    "credentials-unavailable",  # the password or token could not be read (env, file, command)
    "tls-failed",  # certificate, hostname or handshake; or STLS not offered
    "unreachable",  # refused, dropped or timed out connections, [SYS/TEMP]
    "in-use",  # [IN-USE]: another session (often another replica during a handover) holds the maildrop
    "login-delay",  # [LOGIN-DELAY]: logged in too recently
    "protocol-error",  # the server's bytes are not POP3
    "limit-exceeded",  # a reply outgrew its byte cap or its command_deadline; nothing was deleted
    "server-refused",  # [SYS/PERM] or another -ERR we cannot act on
    "config-error",  # the configuration cannot work (e.g. a user name POP3 cannot carry)
    "publish-failed",  # the log (Kafka) did not take the messages; nothing was deleted
    "internal-error",  # a bug in popbridge, contained to this mailbox's pass
]

MAX_BACKOFF: Final = 30 * 60.0
# States that are expected now and then and heal by themselves: logged at info, not warning.
QUIET_STATES: Final = frozenset({"in-use", "login-delay"})


@dataclass(frozen=True)
class Failure:
    """Why a pass failed: the state, a reason without secrets, and the server's wait floor if it set one."""

    state: State
    reason: str
    retry_after: float | None = None
    outage: bool = False  # the log (Kafka) was out of reach: the broker's trouble, not the mailbox's


@dataclass(frozen=True)
class Change:
    """A state change worth one log line."""

    mailbox_id: str
    before: State
    after: State
    reason: str

    @property
    def recovered(self) -> bool:
        return self.after == "ok"

    @property
    def quiet(self) -> bool:
        """Logged at info rather than warning: a recovery, or a state that heals by itself."""
        return self.recovered or self.after in QUIET_STATES

    def message(self) -> str:
        if self.recovered:
            return f"mailbox {self.mailbox_id}: recovered ({self.before} before)"
        return f"mailbox {self.mailbox_id}: {self.after}: {self.reason}"


class MailboxStates:
    """The current state of every mailbox; `observe` says when a change deserves a log line."""

    def __init__(self) -> None:
        self._states: dict[str, State] = {}
        self._reasons: dict[str, str] = {}

    def state(self, mailbox_id: str) -> State:
        return self._states.get(mailbox_id, "ok")

    def observe(self, mailbox_id: str, failure: Failure | None) -> Change | None:
        """Record the outcome of a pass; a Change when the state differs from the last one. A broker
        outage changes nothing here (the module docstring says why)."""
        if failure is not None and failure.outage:
            return None
        before = self.state(mailbox_id)
        after: State = "ok" if failure is None else failure.state
        self._states[mailbox_id] = after
        if before == after:
            return None
        reason = failure.reason if failure else ""
        return Change(mailbox_id, before, after, reason)


@dataclass(frozen=True)
class Timing:
    """What decides the wait before the next poll of one mailbox."""

    poll_interval: float
    failures: int = 0  # consecutive failed passes
    retry_after: float | None = None  # the server's floor ([IN-USE], [LOGIN-DELAY])
    login_delay: float | None = None  # LOGIN-DELAY seconds advertised in CAPA


def next_delay(timing: Timing, rng: random.Random) -> float:
    """The wait before the next poll.

    The interval (at least the advertised LOGIN-DELAY) with +-10% jitter; after failures, exponential
    backoff (doubling, capped at MAX_BACKOFF) with "equal jitter" (half fixed, half random) so replicas
    and mailboxes that failed together do not retry together; never below the server's retry_after.
    """
    base = max(timing.poll_interval, timing.login_delay or 0.0)
    if not timing.failures:
        delay = base * rng.uniform(0.9, 1.1)
    else:
        backoff = min(base * 2 ** min(timing.failures - 1, 16), MAX_BACKOFF)
        delay = backoff / 2 + rng.uniform(0, backoff / 2)
    return max(delay, timing.retry_after or 0.0, timing.login_delay or 0.0)
