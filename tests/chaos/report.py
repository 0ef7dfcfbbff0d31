"""The result of a chaos run: a JSON-ready dict and the table printed at the end."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.chaos.accounting import OUTCOMES, Accounting, Copy, Observations, percentiles
from tests.chaos.observe import KafkaState
from tests.chaos.processes import Managed, tail
from tests.chaos.schedule import Fault

if TYPE_CHECKING:
    from tests.chaos.harness import Options, Timeline

Report = dict[str, Any]
LOST_DETAIL_LIMIT = 50


def build_report(
    options: Options,
    faults: Sequence[Fault],
    accounting: Accounting,
    seen: Observations,
    kafka: KafkaState,
    processes: Sequence[Managed],
    timeline: Timeline,
    copies: Sequence[Copy],
    settled: bool,
    root: Path,
) -> Report:
    duplicates = accounting.duplicates
    return {
        "seed": options.seed, "messages": options.messages, "duration": options.duration,
        "replicas": options.replicas, "faults_enabled": options.faults, "cold_start": options.cold_start,
        "settled": settled, "directory": str(options.keep or root),
        "faults": [f.describe() for f in faults],
        "pairs": len(accounting.outcomes),
        "totals": accounting.totals,
        "dead_letter_reasons": dict(accounting.dead_letter_reasons),
        "misrouted": [
            {"token": c.token, "recipient": c.recipient, "session": c.session} for c in accounting.misrouted
        ],
        "duplicates": {
            "pairs": len(duplicates),
            "extra_copies": sum(d.copies - 1 for d in duplicates),
            "explained": sum(1 for d in duplicates if d.explained),
            "unexplained": sum(1 for d in duplicates if not d.explained),
            "causes": dict(Counter(c.split(":")[0] for d in duplicates for c in d.causes)),
            "list": [
                {"token": d.token, "recipient": d.recipient, "copies": d.copies, "causes": list(d.causes),
                 "fetch_ids": list(d.fetch_ids)}
                for d in duplicates
            ],
        },
        "not_final": {outcome: _details(accounting.pairs(outcome), kafka)
                      for outcome in ("lost", "stuck", "retrying", "on-pop3")},
        "self_crashes": _self_crashes(processes),
        "unclean_sigterm_exits": _unclean_sigterm_exits(processes),
        "signals": [{"at": k.at, "role": k.role, "pid": k.pid, "signal": k.signal} for k in timeline.kills],
        "broker": broker_figures(timeline, copies),
        "latency_seconds": percentiles(accounting.latencies),
        "events": [{"at": at, "what": what} for at, what in timeline.events],
    }  # fmt: skip


def _details(pairs: list[tuple[str, str]], kafka: KafkaState) -> list[dict[str, Any]]:
    """Each pair with where its message was last seen on the topics (the evidence for a loss)."""
    return [
        {"token": token, "recipient": rcpt,
         "routed_to": sorted(kafka.routed_to.get(token, set())),
         "sightings": [s.describe() for s in kafka.sightings.get(token, [])]}
        for token, rcpt in pairs[:LOST_DETAIL_LIMIT]
    ]  # fmt: skip


def _self_crashes(processes: Sequence[Managed]) -> list[dict[str, Any]]:
    return [
        {"process": p.name, "pid": i.pid, "exit_code": i.exit_code, "at": i.ended_at, "log": str(i.log),
         "log_tail": tail(i.log, 25)}
        for p in processes for i in p.incarnations
        if i.ended_at is not None and not i.signal
    ]  # fmt: skip


def _lines_during(before: dict[str, int], after: dict[str, int]) -> Counter[str]:
    """Lines written per replica (all its incarnations' logs, `router-2.3.log`) between two snapshots."""
    written: Counter[str] = Counter()
    for name in {*before, *after}:
        replica = name.split(".")[0]
        if replica != "smtp":
            written[replica] += after.get(name, 0) - before.get(name, 0)
    return written


def _unclean_sigterm_exits(processes: Sequence[Managed]) -> list[dict[str, Any]]:
    """Processes that exited with an error status when asked to stop (SIGTERM): a stop is not an error."""
    return [
        {"process": p.name, "pid": i.pid, "exit_code": i.exit_code, "log_tail": tail(i.log, 10)}
        for p in processes
        for i in p.incarnations
        if i.signal == "SIGTERM" and i.exit_code not in (None, 0, -15)
    ]


def broker_figures(timeline: Timeline, copies: Sequence[Copy]) -> dict[str, Any]:
    """The broker stop's figures: its timeline, the recovery and the log lines per replica per minute
    from the broker's exit (not the stop command: it serves for seconds after it) to its return."""
    stopped, exited, ready = timeline.broker_stopped_at, timeline.broker_exited_at, timeline.broker_ready_at
    if stopped is None or exited is None or ready is None:
        return {}
    delivered_after = sorted(c.at for c in copies if c.at > ready)
    outage_minutes = max((ready - exited) / 60, 1e-9)
    rates = {
        replica: round(lines / outage_minutes, 1)
        for replica, lines in sorted(_lines_during(timeline.lines_at_exit, timeline.lines_at_ready).items())
    }
    return {
        "stop_began_at": stopped, "exited_at": exited,
        **timeline.broker_steps, "ready_at": ready, "outage_seconds": round(ready - exited, 1),
        "recovery_seconds": round(delivered_after[0] - ready, 1) if delivered_after else None,
        "copies_after_ready": len(delivered_after),
        "log_lines_per_minute_during_outage": rates,
        "max_log_lines_per_minute": max(rates.values(), default=0.0),
    }  # fmt: skip


def table(report: Report) -> str:
    """The human summary: counts per outcome, findings, measurements."""
    totals = report["totals"]
    duplicates = report["duplicates"]
    broker = report["broker"]
    lines = [
        f"chaos run seed={report['seed']} messages={report['messages']} duration={report['duration']:g}s "
        f"replicas={report['replicas']} faults={'on' if report['faults_enabled'] else 'off'}"
        f"{' cold-start' if report['cold_start'] else ''} settled={report['settled']}",
        f"  {'pairs (message, recipient)':32} {report['pairs']}",
        *(f"  {outcome:32} {totals[outcome]}" for outcome in OUTCOMES),
        f"  {'misrouted copies':32} {len(report['misrouted'])}",
        f"  {'duplicate pairs (extra copies)':32} {duplicates['pairs']} ({duplicates['extra_copies']})"
        f"  explained {duplicates['explained']}, unexplained {duplicates['unexplained']}"
        f"  {duplicates['causes']}",
        f"  {'self-crashes':32} {len(report['self_crashes'])}"
        + "".join(
            f"\n      {c['process']} pid {c['pid']} exit {c['exit_code']}: {_last_line(c['log_tail'])}"
            for c in report["self_crashes"]
        ),
        f"  {'non-zero exits on SIGTERM':32} {len(report['unclean_sigterm_exits'])}"
        + "".join(
            f"\n      {c['process']} pid {c['pid']} exit {c['exit_code']}: {_last_line(c['log_tail'])}"
            for c in report["unclean_sigterm_exits"]
        ),
        f"  {'dead letters by reason':32} {report['dead_letter_reasons']}",
        f"  {'latency fetch->delivery (s)':32} {report['latency_seconds']}",
    ]
    if broker:
        lines += [
            f"  {'broker outage (s)':32} {broker['outage_seconds']}",
            f"  {'recovery after broker ready (s)':32} {broker['recovery_seconds']}",
            f"  {'max log lines/min in outage':32} {broker['max_log_lines_per_minute']}  "
            f"{broker['log_lines_per_minute_during_outage']}",
        ]
    for outcome in ("lost", "stuck"):
        for detail in report["not_final"][outcome][:10]:
            lines.append(
                f"  {outcome.upper()} {detail['token']} -> {detail['recipient']}: "
                f"routed_to={detail['routed_to']} {'; '.join(detail['sightings']) or 'never on Kafka'}"
            )
    return "\n".join(lines)


_ERROR_LINE = re.compile(r"\b\w+(Error|Exception|Group)\b.*")


def _last_line(text: str) -> str:
    """The last line naming an error (a traceback's last line is often a frame), else the last line."""
    lines = [line.strip(" |+-") for line in text.splitlines() if line.strip(" |+-")]
    errors = [match.group() for line in lines if (match := _ERROR_LINE.search(line))]
    return (errors or lines or ["(empty log)"])[-1][:200]


def failures(report: Report, *, recovery_limit: float = 10.0, log_limit: float = 10.0) -> list[str]:
    """What the run shows to be wrong, per issue 13's "done when"; empty when the run is clean."""
    totals, broker = report["totals"], report["broker"]
    found = [f"{totals[o]} pairs {o}" for o in ("lost", "stuck", "retrying", "on-pop3") if totals[o]]
    if report["misrouted"]:
        found.append(f"{len(report['misrouted'])} misrouted copies")
    if report["duplicates"]["unexplained"]:
        found.append(f"{report['duplicates']['unexplained']} unexplained duplicate pairs")
    if report["self_crashes"]:
        found.append(
            f"{len(report['self_crashes'])} self-crashes: "
            + ", ".join(sorted({c["process"] for c in report["self_crashes"]}))
        )
    if broker and (broker["recovery_seconds"] is None or broker["recovery_seconds"] > recovery_limit):
        found.append(
            f"recovery after the broker restart: {broker['recovery_seconds']} s (limit {recovery_limit:g})"
        )
    if broker and broker["max_log_lines_per_minute"] > log_limit:
        found.append(
            f"up to {broker['max_log_lines_per_minute']} log lines/min during the outage "
            f"(limit {log_limit:g})"
        )
    return found
