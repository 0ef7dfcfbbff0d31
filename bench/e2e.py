"""What a user sees: POP3 in, SMTP out, every contender on the same mail in one run, side by side.

    .venv/bin/python -m bench.e2e [--n 1000] [--repeat 1] [--seed 42] [--only naive,fetchmail,run,...]
                                  [--sink smtp-sink|aiosmtpd] [--many] [--kafka-dir DIR] [--connections 8]

Starts a throwaway Dovecot (services/demo/dovecot.py) and, unless --kafka-dir names a running one, a Kafka
broker (deploy/local/kafka_broker.py); installs fetchmail from Debian when it is missing (as tests/run.sh
installs Dovecot). Each contender drains its own copy of the same generated mailbox (bench/e2e_mail.py)
into the sink (bench/e2e_sink.py), which records every (message, recipient) it accepted:

  single-drop (every message for alice) and catch-all (Delivered-To, Bcc, To/Cc, Received-only, list):
    naive      poplib RETR -> smtplib, one message at a time (bench/e2e_naive.py): the yardstick
    fetchmail  single-drop `is alice here`; multidrop `envelope Delivered-To`, `to * here`
    run        `popbridge run --until-idle`, embedded log        run-kafka  the same on Kafka
    stages     `popbridge router` + `deliverer` (running, ready), then `popbridge fetcher --once`, on Kafka
  --many: M mailboxes x K small messages (2-10 KB), single-drop: fetchmail (one rc with every mailbox,
    its usual way), run, stages; aggregate msg/s and the time to drain them all.

Per contender: msg/s, MB/s, right recipients (n/N), duplicates and wrong copies, CPU seconds and peak RSS
per process (wait4; for the long-running stages, CPU from the fetcher's start on), the broker's CPU for
the Kafka contenders, and msg/s as a ratio to the naive bridge (or fetchmail, for --many) of the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import e2e_contenders as contenders
from bench.e2e_contenders import PASSWORD, Box, Outcome
from bench.e2e_mail import Mail, Score, generate, score
from bench.e2e_sink import AiosmtpdSink, PostfixSink, Sink
from services.demo.dovecot import Dovecot, dovecot_binary, new_root

ROOT = Path(__file__).resolve().parents[1]
BROKER = ROOT / "deploy" / "local" / "kafka_broker.py"
SINGLE = ("naive", "fetchmail", "run", "run-kafka", "stages")
MANY = ("fetchmail", "run", "stages")


@dataclass
class Row:
    name: str
    messages: int
    megabytes: float
    outcome: Outcome
    score: Score

    @property
    def rate(self) -> float:
        return self.messages / self.outcome.seconds


def ensure_fetchmail() -> None:
    """fetchmail from Debian, installed the way tests/run.sh installs Dovecot."""
    if shutil.which("fetchmail"):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print("installing fetchmail from Debian", flush=True)
    subprocess.run([*sudo, "apt-get", "update", "-q"], check=True)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-q", "fetchmail"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, dovecot: Dovecot, kafka: str, broker_pid: int):
        self.args, self.work, self.dovecot, self.kafka, self.broker_pid = (
            args,
            work,
            dovecot,
            kafka,
            broker_pid,
        )
        self._users = 0

    def broker_cpu(self) -> float:
        fields = Path(f"/proc/{self.broker_pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def boxes(self, mails: list[Mail], catch_all: bool) -> list[Box]:
        boxes = []
        for mail in mails:
            self._users += 1
            user = f"u{self._users}"
            self.dovecot.add_user(user, PASSWORD)
            self.dovecot.deliver_many(user, mail.messages)
            boxes.append(Box(user=user, port=self.dovecot.pop3_port, catch_all=catch_all))
        return boxes

    def sink(self, directory: Path) -> Sink:
        return PostfixSink(directory) if self.args.sink == "smtp-sink" else AiosmtpdSink(directory)

    def contend(self, name: str, mails: list[Mail], catch_all: bool) -> Row:
        work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work))
        work.chmod(0o755)
        boxes, sink = self.boxes(mails, catch_all), self.sink(work / "sink")
        expected = set().union(*(mail.pairs for mail in mails))
        sink.start()
        try:
            outcome = self._runner(name, boxes, sink, work, len(expected))()
        finally:
            sink.stop()
        left = sum(self.dovecot.message_count(box.user) for box in boxes)
        if left:
            print(f"  ! {name}: {left} messages left in the POP3 mailboxes", flush=True)
        row = Row(
            name,
            sum(len(m.messages) for m in mails),
            sum(m.megabytes for m in mails),
            outcome,
            score(sink.pairs(), expected),
        )
        shutil.rmtree(work, ignore_errors=True)
        print(f"  {line(row, None)}", flush=True)
        return row

    def _runner(
        self, name: str, boxes: list[Box], sink: Sink, work: Path, expected: int
    ) -> Callable[[], Outcome]:
        connections = self.args.connections
        if name == "naive":
            return lambda: contenders.naive(boxes, sink, work)
        if name == "fetchmail":
            return lambda: contenders.fetchmail(boxes, sink, work)
        if name in ("run", "run-kafka"):
            kafka = self.kafka if name == "run-kafka" else None

            def measured() -> Outcome:
                before = self.broker_cpu()
                outcome = contenders.run(boxes, sink, work, kafka=kafka, connections=connections)
                outcome.broker_cpu = self.broker_cpu() - before if kafka else None
                return outcome

            return measured
        return lambda: contenders.stages(
            boxes,
            sink,
            work,
            kafka=self.kafka,
            connections=connections,
            expected=expected,
            broker_cpu=self.broker_cpu,
        )


def line(row: Row, baseline: Row | None) -> str:
    o, s = row.outcome, row.score
    ratio = f"{row.rate / baseline.rate:5.2f}x" if baseline is not None else "     "
    per_process = ", ".join(f"{n} {u.cpu:.1f} s/{u.rss_mb:.0f} MB" for n, u in o.processes.items())
    broker = f", broker {o.broker_cpu:.1f} s" if o.broker_cpu is not None else ""
    return (
        f"{row.name:18} {row.rate:7.1f} msg/s {row.megabytes / o.seconds:6.1f} MB/s {o.seconds:5.0f} s "
        f"{ratio} "
        f"right {s.right}/{s.expected} dup {s.duplicates} wrong {s.wrong} "
        f"| CPU/peak RSS: {per_process}{broker}"
    )


def print_table(title: str, rows: list[Row], baseline_name: str) -> None:
    print(f"\n{title}")
    baseline = next((r for r in rows if r.name.startswith(baseline_name)), None)
    for row in rows:
        print(f"  {line(row, baseline)}")


def single_mailbox(bench: Bench, only: set[str]) -> None:
    args = bench.args
    for catch_all in (False, True):
        variant = "catch-all" if catch_all else "single-drop"
        mail = generate(args.n, args.seed, catch_all=catch_all)
        for attempt in range(args.repeat):
            title = f"one {variant} mailbox: {args.n} messages, {mail.megabytes:.0f} MB, sink {args.sink}"
            print(f"\n{title} (pass {attempt + 1})", flush=True)
            rows = [_named(bench, name, [mail], catch_all) for name in SINGLE if name in only]
            print_table(f"{title}, ratio to naive", rows, "naive")


def _named(bench: Bench, name: str, mails: list[Mail], catch_all: bool) -> Row:
    row = bench.contend(name, mails, catch_all)
    if name == "fetchmail":
        row.name = "fetchmail multidrop" if catch_all else "fetchmail single"
    return row


def many_mailboxes(bench: Bench, only: set[str]) -> None:
    args = bench.args
    mails = [
        generate(args.per_mailbox, args.seed, catch_all=False, small_only=True, tag=tag + 1)
        for tag in range(args.mailboxes)
    ]
    title = (
        f"{args.mailboxes} mailboxes x {args.per_mailbox} messages (2-10 KB), "
        f"{sum(m.megabytes for m in mails):.0f} MB, sink {args.sink}"
    )
    print(f"\n{title}", flush=True)
    rows = [_named(bench, name, mails, False) for name in ("naive", *MANY) if name in only]
    print_table(f"{title}, ratio to fetchmail (s: the time to drain them all)", rows, "fetchmail")


def start_broker(directory: Path) -> None:
    subprocess.run(
        [sys.executable, str(BROKER), "start", "--dir", str(directory), "--heap", "768m"],
        check=True,
        timeout=600,
        stdout=subprocess.DEVNULL,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="messages in the one-mailbox runs")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", default=",".join(SINGLE), help=f"comma-separated of {', '.join(SINGLE)}")
    parser.add_argument("--sink", choices=("smtp-sink", "aiosmtpd"), default="smtp-sink")
    parser.add_argument("--many", action="store_true", help="also the many-mailbox run")
    parser.add_argument("--many-only", action="store_true", help="only the many-mailbox run")
    parser.add_argument("--mailboxes", type=int, default=100)
    parser.add_argument("--per-mailbox", type=int, default=100)
    parser.add_argument("--connections", type=int, default=8, help="popbridge's delivery.connections")
    parser.add_argument("--kafka-dir", type=Path, help="the directory of a running kafka_broker.py broker")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so Dovecot, the broker and the sink are stopped by the `finally`s.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    only = set(args.only.split(","))
    if "fetchmail" in only:
        ensure_fetchmail()
    binary = dovecot_binary()
    if binary is None:
        raise SystemExit("Dovecot is not installed (tests/run.sh installs it from Debian)")
    work = new_root("popbridge-e2e-")
    broker_dir = args.kafka_dir or work / "kafka"
    try:
        if args.kafka_dir is None:
            start_broker(broker_dir)
        kafka = (broker_dir / "bootstrap").read_text().strip()
        broker_pid = int((broker_dir / "broker.pid").read_text())
        dovecot = Dovecot(work / "dovecot", binary=binary, instance="popbridge-e2e")
        with dovecot:
            bench = Bench(args, work, dovecot, kafka, broker_pid)
            print(
                f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; started {time.strftime('%H:%M:%S')}"
            )
            if not args.many_only:
                single_mailbox(bench, only)
            if args.many or args.many_only:
                many_mailboxes(bench, only)
    finally:
        if args.kafka_dir is None:
            subprocess.run(
                [sys.executable, str(BROKER), "stop", "--dir", str(broker_dir)], check=False, timeout=120
            )
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
