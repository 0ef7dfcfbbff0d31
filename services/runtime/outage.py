"""A bounded account of a broker outage in the log: a few lines a minute, whatever the clients retry.

While the broker is unreachable, every aiokafka client of a process retries every `retry_backoff_ms` and
logs each failure (`Unable connect to node with id 1`, `Heartbeat send request failed`, ...): a deliverer
with seven consumers wrote thousands of lines a second. `KafkaLogThrottle`, a filter on the handler,
turns that into:

- the first failure, as aiokafka wrote it;
- then at most one line per `every` seconds: "kafka: still unreachable for N s (M attempts): <last error>";
- "kafka: reconnected after N s (M failed attempts)" once any Kafka call of the process succeeds again
  (`BrokerOutage.recovered`, called by services.runtime.kafka on each success) or a consumer finds its
  group coordinator again (aiokafka's INFO line "Discovered coordinator", which `install` lets through to
  the filter only as that signal: aiokafka's INFO lines are never written).

Lines reporting a refused authorization or login are dropped: the refusal also reaches the caller as an
error, which the stage or command says in one line. Other aiokafka warnings (group rebalances) pass, at
most `burst` per message template per `every` seconds.
The stages' own "waiting for the broker" lines go through `BrokerOutage.failed` too, so they count as
attempts and share the same bound. Time is injected (`clock`, monotonic seconds) for the tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]
EVERY = 60.0  # seconds between two "still unreachable" lines
BURST = 5  # other aiokafka warnings of one template per EVERY seconds
TEMPLATES = 256  # bound on the templates remembered for the burst count

log = logging.getLogger("popbridge.kafka")

# aiokafka messages (their format strings) that mean "cannot talk to the broker".
_UNREACHABLE = (
    "Unable connect",
    "Unable to request metadata",
    "Unable to update metadata",
    "Group Coordinator Request failed",
    "Heartbeat send request failed",
    "Failed fetch messages",
    "Failed fetch offsets",
    "Marking the coordinator dead",
    "Heartbeat session expired",
    "is either not started or not valid",
    "coordinator error",
    "Got error produce response",
    "Unable to bootstrap",
    "Coordinator dead",
)


# Error names in aiokafka lines that report the broker refusing this user (ACLs, login). Such a refusal also
# reaches the caller as a KafkaError, which the stage or command reports in one line and exits on.
_REFUSALS = ("AuthorizationFailed", "SaslAuthenticationFailed")


def is_refusal(message: str) -> bool:
    """True for an aiokafka line that reports an authorization or login refusal."""
    return any(name in message for name in _REFUSALS)


def is_unreachable(template: str) -> bool:
    """True for an aiokafka message that reports the broker out of reach."""
    return any(marker in template for marker in _UNREACHABLE)


@dataclass
class Outage:
    """The decision part: what to say about one more failure or a success (pure, clock passed in)."""

    every: float = EVERY
    since: float | None = None  # when the current outage began; None while the broker answers
    attempts: int = 0
    reported_at: float = 0.0
    # Right after a reconnection each client meets the broker still loading its groups ("coordinator not
    # available") for a moment: failures within `every` seconds of a recovery start a quiet outage, which
    # says nothing unless it lasts a whole `every` (then it is reported as any other).
    ended_at: float | None = None
    quiet: bool = False

    def failure(self, now: float) -> str | None:
        """"first" for the first failure of an outage, a summary once per `every` seconds, else None."""
        if self.since is None:
            self.since, self.attempts, self.reported_at = now, 1, now
            self.quiet = self.ended_at is not None and now - self.ended_at < self.every
            return None if self.quiet else "first"
        self.attempts += 1
        if now - self.reported_at < self.every:
            return None
        self.reported_at, self.quiet = now, False
        return f"kafka: still unreachable for {now - self.since:.0f} s ({self.attempts} attempts)"

    def recovery(self, now: float) -> str | None:
        """The "reconnected" line when an outage was going on (and it ends it), else None."""
        if self.since is None:
            return None
        text = f"kafka: reconnected after {now - self.since:.0f} s ({self.attempts} failed attempts)"
        quiet = self.quiet
        self.since, self.attempts, self.ended_at, self.quiet = None, 0, now, False
        return None if quiet else text


@dataclass
class BrokerOutage:
    """The process's view of the broker: shared by the log filter and the stages."""

    clock: Clock = time.monotonic
    outage: Outage = field(default_factory=Outage)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def down(self) -> bool:
        return self.outage.since is not None

    def note_failure(self) -> str | None:
        with self._lock:
            return self.outage.failure(self.clock())

    def failed(self, what: str) -> None:
        """A stage's own failure to reach the broker: logged within the outage's bound."""
        verdict = self.note_failure()
        if verdict == "first":
            log.warning("kafka: %s", what)
        elif verdict is not None:
            log.warning("%s: %s", verdict, what)

    def recovered(self) -> None:
        """A Kafka call succeeded: ends an outage with one line (cheap when there was none)."""
        if self.outage.since is None:
            return
        with self._lock:
            text = self.outage.recovery(self.clock())
        if text is not None:
            log.warning("%s", text)


RECONNECTED = "Discovered coordinator"  # aiokafka, INFO: a consumer talks to its group's broker again
COORDINATOR_LOGGER = "aiokafka.consumer.group_coordinator"

BROKER = BrokerOutage()
"""The outage state of this process: one broker cluster per process."""


class KafkaLogThrottle(logging.Filter):
    """Handler filter bounding aiokafka's lines (see the module docstring)."""

    def __init__(self, broker: BrokerOutage = BROKER, *, burst: int = BURST) -> None:
        super().__init__()
        self.broker = broker
        self.burst = burst
        self._seen: dict[str, tuple[float, int]] = {}  # template -> (window start, lines in it)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka"):
            return True
        if record.levelno < logging.WARNING:
            if self.broker.down and str(record.msg).startswith(RECONNECTED):
                self.broker.recovered()
            return False  # aiokafka's INFO chatter stays out (services.runtime.logs)
        if is_refusal(record.getMessage()):
            return False  # the refusal reaches our code as an error, which says it in one line
        template = str(record.msg)
        if is_unreachable(template) or self.broker.down:
            return self._failure(record)
        return self._within_burst(template)

    def _failure(self, record: logging.LogRecord) -> bool:
        verdict = self.broker.note_failure()
        if verdict is None:
            return False
        if verdict != "first":
            record.msg, record.args = f"{verdict}: %s", (record.getMessage(),)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True

    def _within_burst(self, template: str) -> bool:
        now = self.broker.clock()
        start, count = self._seen.get(template, (now, 0))
        if now - start >= self.broker.outage.every:
            start, count = now, 0
        if len(self._seen) >= TEMPLATES and template not in self._seen:
            self._seen.clear()
        self._seen[template] = (start, count + 1)
        return count < self.burst


def install(handler: logging.Handler, broker: BrokerOutage = BROKER) -> None:
    """Bound aiokafka's lines on `handler`, and let the coordinator's INFO lines reach the filter as the
    signal that the broker is back (the filter writes none of them)."""
    handler.addFilter(KafkaLogThrottle(broker))
    logging.getLogger(COORDINATOR_LOGGER).setLevel(logging.INFO)
