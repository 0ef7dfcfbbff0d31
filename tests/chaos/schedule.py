"""The fault schedule of a chaos run, generated from its seed: the same seed gives the same faults.

Faults run one after another (a fault starts at its time or when the one before it has ended, whichever
is later), so each is a single fault the pipeline must absorb. Kinds:

    kill            SIGKILL or SIGTERM one stage process at a random moment (mid-batch), restart it
    kill-starting   restart a process and kill it again while it starts (0.2-3 s after its start)
    kill-rebalance  SIGTERM one replica (its group rebalances), then SIGKILL another of the same stage
                    during that rebalance; restart both
    kill-mid-smtp   wait until the SMTP server holds a DATA it has not answered, SIGKILL the deliverer
                    whose session it is; restart it
    broker-stop     stop the Kafka broker for `down` seconds, start it again (same data directory)
    dovecot-kill    SIGKILL every Dovecot process, restart it after `down` seconds (same ports)
    smtp-down       SIGKILL the SMTP server, restart it after `down` seconds (same port, same journal)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

STAGES = ("fetcher", "router", "deliverer")
SIGNALS = ("SIGKILL", "SIGTERM")


@dataclass(frozen=True, kw_only=True)
class Fault:
    """One fault: when (seconds after the fault phase began), what, on which process, for how long."""

    at: float
    kind: str
    target: str = ""  # e.g. "router-2"; for kill-rebalance the first of the two
    second: str = ""  # kill-rebalance: the replica killed during the rebalance
    signal: str = "SIGKILL"
    down: float = 0.0  # seconds the target stays down before it is restarted
    delay: float = 0.0  # kill-starting / kill-rebalance: seconds between the two steps

    def describe(self) -> str:
        parts = [f"t+{self.at:6.1f}s", self.kind]
        if self.second:
            parts.append(f"SIGTERM {self.target}, then {self.signal} {self.second}")
        elif self.target:
            parts.append(f"{self.signal} {self.target}")
        if self.delay:
            parts.append(f"after {self.delay:.1f}s")
        if self.down:
            parts.append(f"down {self.down:.1f}s")
        return " ".join(parts)


def plan_faults(seed: int, duration: float, replicas: int, *, short: bool = False) -> list[Fault]:
    """The faults of a run whose fault phase lasts `duration` seconds, in time order.

    A full schedule has one broker stop (20-30 s), one Dovecot kill, one SMTP outage, one of each kill
    kind and random kills for the rest of the time (about one fault per 15 s). The short one (the test in
    the default run): two kills, one mid-SMTP kill and one broker stop of 10-15 s.
    """
    rng = random.Random(seed)
    kinds = ["kill", "kill", "kill-mid-smtp", "broker-stop"] if short else _full_kinds(rng, duration)
    rng.shuffle(kinds)
    times = sorted(rng.uniform(0.05, 0.85) * duration for _ in kinds)
    return [_fault(rng, kind, at, replicas, short) for kind, at in zip(kinds, times, strict=True)]


def _full_kinds(rng: random.Random, duration: float) -> list[str]:
    fixed = ["broker-stop", "dovecot-kill", "smtp-down", "kill-starting", "kill-rebalance", "kill-mid-smtp"]
    extra = max(0, int(duration / 15) - len(fixed))
    return fixed + rng.choices(["kill", "kill", "kill-mid-smtp", "kill-starting", "kill-rebalance"], k=extra)


def _fault(rng: random.Random, kind: str, at: float, replicas: int, short: bool) -> Fault:
    stage = rng.choice(STAGES)
    target = f"{stage}-{rng.randint(1, replicas)}"
    if kind == "broker-stop":
        return Fault(at=at, kind=kind, down=rng.uniform(10, 15) if short else rng.uniform(20, 30))
    if kind == "dovecot-kill":
        return Fault(at=at, kind=kind, down=rng.uniform(3, 10))
    if kind == "smtp-down":
        return Fault(at=at, kind=kind, down=rng.uniform(5, 20))
    if kind == "kill-mid-smtp":
        return Fault(at=at, kind=kind, target="deliverer", down=rng.uniform(1, 5))
    if kind == "kill-starting":
        return Fault(
            at=at,
            kind=kind,
            target=target,
            signal=rng.choice(SIGNALS),
            down=rng.uniform(1, 4),
            delay=rng.uniform(0.2, 3.0),
        )
    if kind == "kill-rebalance":
        others = [n for n in range(1, replicas + 1) if f"{stage}-{n}" != target]
        second = f"{stage}-{rng.choice(others)}" if others else target
        return Fault(
            at=at,
            kind=kind,
            target=target,
            second=second,
            signal="SIGKILL",
            down=rng.uniform(1, 5),
            delay=rng.uniform(0.2, 2.0),
        )
    return Fault(at=at, kind="kill", target=target, signal=rng.choice(SIGNALS), down=rng.uniform(1, 5))
