"""One chaos run: real broker, real Dovecot, the scripted SMTP server, every stage replica its own process.

Over 500 lines on purpose: ChaosRun is one run's phases in order; processes, faults, accounting live apart.

Phases: set up (own broker, Dovecot, SMTP server, topics, mailboxes with part of the mail), start the
stages (replica 1 of each, the others a few seconds later; or all at once with `cold_start`), the fault
phase (`duration` seconds: more mail arrives, the seeded faults run one after another), the settle phase
(until every message is delivered or dead-lettered, or `settle` seconds), then every process is stopped and
the run is accounted for (tests.chaos.accounting) from the journal, the topics and the maildirs.

The harness is one thread polling every TICK seconds; faults are generators that yield the condition they
wait for, so no step sleeps blindly and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import codec
from schemas.events import DeliveryDeadLettered
from schemas.topics import DEAD_LETTERS
from services.demo.dovecot import dovecot_binary
from services.runtime.kafka import KafkaLog
from services.runtime.settings import DeploymentSettings
from tests.chaos import mail
from tests.chaos.accounting import Kill, Observations, account
from tests.chaos.observe import KafkaState, journal_copies, read_kafka, token_of, tokens_in_maildirs
from tests.chaos.processes import STOP_GRACE, Broker, Managed, free_port, line_count, process_running, tail
from tests.chaos.report import Report, build_report
from tests.chaos.schedule import STAGES, Fault, plan_faults
from tests.support.dovecot import DovecotServer
from tests.support.mail_config import delivery_to, mailbox, write_mail_config
from tests.support.scripted_smtp import read_journal

TICK = 0.1
CRASH_RESTART_DELAY = 2.0  # a self-crashed process is restarted, as Kubernetes would
STAGGER = 5.0  # seconds between the first replica of each stage and the others (not with cold_start)
MID_SMTP_WAIT = 20.0  # how long kill-mid-smtp waits for a DATA in flight before killing at random
QUIET = 5.0  # after everything is accounted for, wait this long for late duplicates
STEP_TIMEOUT = 120.0  # any single wait inside a fault
SMTP_START_TIMEOUT = 30.0
Wait = Callable[[], bool]


@dataclass(frozen=True, kw_only=True)
class Options:
    seed: int
    messages: int = 100
    duration: float = 60.0
    replicas: int = 2
    faults: bool = True
    short: bool = False  # the short fault profile (the default test run)
    cold_start: bool = False
    settle: float = 180.0
    keep: Path | None = None  # keep the run's directory (logs, journal) here instead of deleting it
    prefill: float = 0.3  # share of the mail in the mailboxes before the stages start


@dataclass
class Timeline:
    """What happened when (epoch seconds), for the report."""

    events: list[tuple[float, str]] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    broker_stopped_at: float | None = None  # the stop command began (the broker still serves a while)
    broker_exited_at: float | None = None  # the broker's process was gone: the outage proper begins
    broker_ready_at: float | None = None
    broker_steps: dict[str, float] = field(default_factory=dict)  # when the stop ended, the start began
    lines_at_exit: dict[str, int] = field(default_factory=dict)
    lines_at_ready: dict[str, int] = field(default_factory=dict)
    origin: float = field(default_factory=time.time)
    phase_started: float = 0.0

    def note(self, text: str) -> None:
        now = time.time()
        self.events.append((now, text))
        print(f"[chaos {now - self.origin:6.1f}s] {text}", file=sys.stderr, flush=True)


class ChaosRun:
    def __init__(self, options: Options, root: Path) -> None:
        self.options = options
        self.root = root
        self.timeline = Timeline()
        self.plan = mail.generate(options.seed, options.messages)
        self.faults = (
            plan_faults(options.seed, options.duration, options.replicas, short=options.short)
            if options.faults
            else []
        )
        self.broker = Broker(root / "kafka")
        self.dovecot: DovecotServer | None = None
        self.smtp: Managed | None = None
        self.smtp_port = 0
        self.stages: dict[str, Managed] = {}
        self.http_ports: dict[str, int] = {}
        self.restart_at: dict[str, float] = {}
        self.passwords = {box: secrets.token_urlsafe(12) for box in mail.MAILBOXES}
        self.settings = DeploymentSettings(topic_prefix="chaos.", group_prefix="chaos")
        self.stopping = False
        self._pending_mail: list[tuple[float, mail.Planned]] = []
        self._outage_mail: list[mail.Planned] = []  # arrives while the broker is down (see _schedule_mail)
        self._journal_offset = 0
        self._open_data: dict[str, tuple[str, int | None]] = {}  # session -> (token, client pid)
        self._session_pids: dict[str, int | None] = {}

    # --- the whole run ------------------------------------------------------------------------------

    def execute(self) -> Report:
        print(
            f"chaos: seed={self.options.seed} messages={self.options.messages} "
            f"duration={self.options.duration:g}s replicas={self.options.replicas} dir={self.root}",
            file=sys.stderr,
        )
        for fault in self.faults:
            print(f"chaos: fault {fault.describe()}", file=sys.stderr)
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(self._destroy_everything)
            self._set_up()
            self._start_stages()
            self._fault_phase()
            settled = self._settle()
            self._stop_stages()
            return self._account(settled)
        raise AssertionError("unreachable")  # pragma: no cover - ExitStack does not swallow

    # --- set-up ---------------------------------------------------------------------------------------

    def _set_up(self) -> None:
        (self.root / "kafka").mkdir(parents=True)
        (self.root / "logs").mkdir()
        self.timeline.note(f"broker: {self.broker.start_blocking()}")
        binary = dovecot_binary()
        if binary is None:
            raise RuntimeError("the dovecot binary is not installed (apt-get install dovecot-pop3d)")
        dovecot_root = self.root / "dovecot"
        dovecot_root.mkdir(mode=0o755)
        self.dovecot = DovecotServer(dovecot_root, binary=binary)
        self.dovecot.start()
        for box in mail.MAILBOXES:
            self.dovecot.add_user(self._login(box), self.passwords[box])
        self._start_smtp(port=0)
        self._write_config()
        self._create_topics()
        prefill = int(len(self.plan) * self.options.prefill)
        self._deliver_mail(self.plan[:prefill])
        self.timeline.note(f"{prefill} messages in the mailboxes before the stages start")
        self._schedule_mail(self.plan[prefill:])

    def _login(self, box: str) -> str:
        return f"chaos-{box}"

    def _start_smtp(self, port: int) -> None:
        """Start the scripted SMTP server (port 0: it picks one) or restart it on its port and journal."""
        directory = self.root / "smtp"
        directory.mkdir(exist_ok=True)
        port_file = directory / "port"
        port_file.unlink(missing_ok=True)
        journal = directory / "journal.jsonl"
        command = [sys.executable, "-m", "tests.support.scripted_smtp", "--journal", str(journal),
                   "--port-file", str(port_file), "--port", str(port)]  # fmt: skip
        if self.smtp is None:
            self.smtp = Managed("smtp", "smtp", command, dict(os.environ), self.root / "logs")
        self.smtp.command = command
        started = self.smtp.start()
        deadline = time.monotonic() + SMTP_START_TIMEOUT
        while not port_file.exists():
            if not self.smtp.alive or time.monotonic() > deadline:
                raise RuntimeError(f"the SMTP server did not start:\n{tail(started.log)}")
            time.sleep(0.05)
        self.smtp_port = int(port_file.read_text())

    def _write_config(self) -> None:
        assert self.dovecot is not None
        boxes = [
            mailbox(box, self.dovecot.host, self.dovecot.pop3_port, self._login(box),
                    tuple(filter(None, [mail.SINGLE_USER_BOXES.get(box)])),  # none: a catch-all box
                    password_env=self._password_env(box), poll_interval=1.0, timeout=15.0)
            for box in mail.MAILBOXES
        ]  # fmt: skip
        routing = {"primary_domain": mail.DOMAIN, "local_domains": [mail.DOMAIN], "users": list(mail.USERS),
                   "postmaster": mail.POSTMASTER, "trusted_received_hosts": [mail.TRUSTED_HOST]}
        delivery = delivery_to(self.smtp_port, helo_name="popbridge.chaos", timeout=15.0,
                               retry_delays=[2.0, 4.0, 8.0])
        write_mail_config(self.root / "popbridge.toml", delivery=delivery, routing=routing, mailboxes=boxes)

    def _password_env(self, box: str) -> str:
        return "CHAOS_PW_" + box.upper().replace("-", "_")

    def _environment(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "POPBRIDGE_KAFKA_BOOTSTRAP": self.broker.bootstrap,
                "POPBRIDGE_TOPIC_PREFIX": self.settings.topic_prefix,
                "POPBRIDGE_GROUP_PREFIX": self.settings.group_prefix,
                "POPBRIDGE_LOG_FORMAT": "json",
                "POPBRIDGE_HTTP_PORT": str(self.http_ports.setdefault(name, free_port())),
                # One data directory per replica, kept across its restarts: a pod's volume (the
                # deliverer's ledger store lives there).
                "POPBRIDGE_DATA_DIR": str(self.root / "data" / name),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.pop("POPBRIDGE_TEST_KAFKA", None)
        env.update({self._password_env(box): password for box, password in self.passwords.items()})
        return env

    def _create_topics(self) -> None:
        command = [sys.executable, "-m", "services.cli", "topics", "create"]
        result = subprocess.run(
            command,
            env=self._environment("topics"),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=Path(__file__).resolve().parents[2],
        )
        if result.returncode != 0:
            raise RuntimeError(f"popbridge topics create failed: {result.stderr.strip()[-2000:]}")
        self.timeline.note("topics created")

    # --- mail -----------------------------------------------------------------------------------------

    def _deliver_mail(self, planned: list[mail.Planned]) -> None:
        assert self.dovecot is not None
        for message in planned:
            for box, raw in message.copies:
                self.dovecot.deliver(self._login(box), raw)

    def _schedule_mail(self, planned: list[mail.Planned]) -> None:
        """The rest of the mail arrives in batches every 2 s over the first 60% of the fault phase, except
        a few messages kept for the broker's outage: they arrive while it is down, so there is work
        waiting when it returns and the recovery time is measured whenever the outage falls."""
        keep = max(5, len(planned) // 50) if len(planned) > 10 else 0
        planned, self._outage_mail = planned[: len(planned) - keep], planned[len(planned) - keep :]
        batches = max(1, int(self.options.duration * 0.6 / 2))
        for index, message in enumerate(planned):
            self._pending_mail.append(((index * batches // max(1, len(planned))) * 2.0, message))

    def _mail_due(self, elapsed: float) -> None:
        due = [m for at, m in self._pending_mail if at <= elapsed]
        if due:
            self._pending_mail = [(at, m) for at, m in self._pending_mail if at > elapsed]
            self._deliver_mail(due)

    # --- stages ---------------------------------------------------------------------------------------

    def _start_stages(self) -> None:
        config = str(self.root / "popbridge.toml")
        for stage in STAGES:
            for replica in range(1, self.options.replicas + 1):
                name = f"{stage}-{replica}"
                command = [sys.executable, "-m", "services.cli", stage, "--config", config]
                self.stages[name] = Managed(name, stage, command, self._environment(name), self.root / "logs")
        first = [name for name in self.stages if name.endswith("-1")]
        order = list(self.stages) if self.options.cold_start else first
        for name in order:
            self._start(name)
        if not self.options.cold_start:
            self._run_until(lambda: False, STAGGER)
            for name in self.stages:
                if name not in first:
                    self._start(name)

    def _start(self, name: str) -> None:
        process = self.stages[name]
        process.env["POPBRIDGE_HTTP_PORT"] = str(self.http_ports[name])
        incarnation = process.start()
        self.restart_at.pop(name, None)
        self.timeline.note(f"started {name} (pid {incarnation.pid}, #{incarnation.number})")

    # --- the loop -------------------------------------------------------------------------------------

    def _fault_phase(self) -> None:
        self.timeline.phase_started = time.time()
        self.timeline.note("fault phase begins" if self.faults else "run begins (no faults)")
        started = time.monotonic()
        scripts = iter([self._fault_script(fault, started) for fault in self.faults])
        current: Iterator[Wait] | None = next(scripts, None)
        waiting: Wait | None = None
        while True:
            self._tick(time.monotonic() - started)
            if current is not None and (waiting is None or waiting()):
                waiting = next(current, None)
                if waiting is None:
                    current = next(scripts, None)
            if current is None and time.monotonic() - started >= self.options.duration:
                break
            time.sleep(TICK)
        self._deliver_mail([m for _, m in self._pending_mail] + self._outage_mail)
        self._pending_mail.clear()
        self._outage_mail = []
        self.timeline.note("fault phase over")

    def _run_until(self, done: Wait, limit: float) -> bool:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            self._tick(None)
            if done():
                return True
            time.sleep(TICK)
        return False

    def _tick(self, elapsed: float | None) -> None:
        if elapsed is not None:
            self._mail_due(elapsed)
        self._read_journal()
        for name, process in self.stages.items():
            self._watch(name, process)
        if self.smtp is not None and not self.stopping:
            ended = self.smtp.poll()
            if ended is not None and not ended.signal:
                self.timeline.note(f"SELF-CRASH smtp server exit {ended.exit_code}; restarting it")
                self._start_smtp(self.smtp_port)

    def _watch(self, name: str, process: Managed) -> None:
        ended = process.poll()
        if ended is not None:
            how = f"after {ended.signal}" if ended.signal else "WITHOUT being signalled (self-crash)"
            self.timeline.note(f"{name} pid {ended.pid} exited {ended.exit_code} {how}")
            if not ended.signal and not self.stopping:
                if "Address already in use" in tail(ended.log, 40):
                    self.http_ports[name] = free_port()
                    self.timeline.note(f"{name}: its health port was taken; next start on another")
                self.restart_at[name] = time.monotonic() + CRASH_RESTART_DELAY
        if process.overdue():
            self.timeline.note(f"{name} pid {process.pid} ignored SIGTERM for {STOP_GRACE:g}s: SIGKILL")
            self._signal(name, "SIGKILL")
        due = self.restart_at.get(name)
        if due is not None and time.monotonic() >= due and not process.alive and not self.stopping:
            self._start(name)

    def _signal(self, name: str, signame: str) -> None:
        pid = self.stages[name].send(signame)
        if pid is not None:
            self.timeline.kills.append(
                Kill(at=time.time(), role=self.stages[name].role, pid=pid, signal=signame)
            )
            self.timeline.note(f"{signame} {name} (pid {pid})")

    def _read_journal(self) -> None:
        path = self.root / "smtp" / "journal.jsonl"
        try:
            with path.open("rb") as journal:
                journal.seek(self._journal_offset)
                chunk = journal.read()
        except OSError:
            return
        complete = chunk.rfind(b"\n") + 1
        self._journal_offset += complete
        for line in chunk[:complete].splitlines():
            with contextlib.suppress(ValueError):
                self._journal_entry(json.loads(line))

    def _journal_entry(self, entry: dict[str, Any]) -> None:
        session = entry.get("s", "")
        if entry["k"] == "session":
            self._session_pids[session] = entry.get("client_pid")
        elif entry["k"] == "data" and entry["outcome"] == "accepted":
            self._open_data[session] = (entry["token"], self._session_pids.get(session))
        elif entry["k"] in ("replied", "end"):
            self._open_data.pop(session, None)
        elif entry["k"] == "up":
            self._open_data.clear()

    # --- faults ---------------------------------------------------------------------------------------

    def _fault_script(self, fault: Fault, started: float) -> Iterator[Wait]:
        yield lambda: time.monotonic() - started >= fault.at
        self.timeline.note(f"fault: {fault.describe()}")
        script = {
            "kill": self._kill, "kill-starting": self._kill_starting, "kill-rebalance": self._kill_rebalance,
            "kill-mid-smtp": self._kill_mid_smtp, "broker-stop": self._broker_stop,
            "dovecot-kill": self._dovecot_kill, "smtp-down": self._smtp_down,
        }[fault.kind]  # fmt: skip
        yield from script(fault)

    def _after(self, seconds: float) -> Wait:
        until = time.monotonic() + seconds
        return lambda: time.monotonic() >= until

    def _exited(self, name: str) -> Wait:
        limit = time.monotonic() + STEP_TIMEOUT
        return lambda: not self.stages[name].alive or time.monotonic() > limit

    def _down_and_up(self, name: str, signame: str, down: float) -> Iterator[Wait]:
        if not self.stages[name].alive:
            self.timeline.note(f"{name} is not running; nothing to kill")
            return
        self.restart_at.pop(name, None)
        self._signal(name, signame)
        yield self._exited(name)
        yield self._after(down)
        if not self.stages[name].alive:
            self._start(name)

    def _kill(self, fault: Fault) -> Iterator[Wait]:
        yield from self._down_and_up(fault.target, fault.signal, fault.down)

    def _kill_starting(self, fault: Fault) -> Iterator[Wait]:
        yield from self._down_and_up(fault.target, "SIGKILL", fault.down)
        yield self._after(fault.delay)
        yield from self._down_and_up(fault.target, fault.signal, fault.down)

    def _kill_rebalance(self, fault: Fault) -> Iterator[Wait]:
        self._signal(fault.target, "SIGTERM")  # leaves the group: the others rebalance now
        yield self._after(fault.delay)
        yield from self._down_and_up(fault.second, fault.signal, fault.down)
        yield self._exited(fault.target)
        if not self.stages[fault.target].alive:
            self._start(fault.target)

    def _kill_mid_smtp(self, fault: Fault) -> Iterator[Wait]:
        deliverers = {p.pid: n for n, p in self.stages.items() if p.role == "deliverer" and p.alive}
        limit = time.monotonic() + MID_SMTP_WAIT

        def in_flight() -> bool:
            return any(pid in deliverers for _, pid in self._open_data.values()) or time.monotonic() > limit

        yield in_flight
        pids = [pid for _, pid in self._open_data.values() if pid in deliverers]
        if pids:
            name = deliverers[pids[0]]
            self.timeline.note(f"a DATA of {name} is in flight")
        else:
            name = random.Random(fault.at).choice(sorted(n for n in self.stages if n.startswith("deliverer")))
            self.timeline.note(f"no DATA in flight within {MID_SMTP_WAIT:g}s; killing {name} anyway")
        yield from self._down_and_up(name, "SIGKILL", fault.down)

    def _broker_stop(self, fault: Fault) -> Iterator[Wait]:
        self.timeline.broker_stopped_at = time.time()
        pid = self.broker.pid()
        self.broker.begin("stop")
        # The broker serves for a few seconds after the stop command (its controlled shutdown): the
        # outage, and the log lines counted in it, begin when its process is gone.
        yield self._broker_gone(pid)
        self.timeline.broker_exited_at = time.time()
        self.timeline.lines_at_exit = self._log_lines()
        self.timeline.note(f"broker: pid {pid} exited")
        yield self._broker_done("stop")
        self.timeline.broker_steps["stop_finished_at"] = time.time()
        self._deliver_mail(self._outage_mail)
        self._outage_mail = []
        yield self._after(max(0.0, fault.down - (time.time() - self.timeline.broker_stopped_at)))
        self.timeline.note("broker: starting again")
        self.timeline.broker_steps["start_began_at"] = time.time()
        self.broker.begin("start")
        yield self._broker_done("start")
        self.timeline.broker_ready_at = time.time()
        self.timeline.lines_at_ready = self._log_lines()
        self.timeline.note("broker: accepting connections again")

    def _broker_gone(self, pid: int | None) -> Wait:
        limit = time.monotonic() + STEP_TIMEOUT
        return lambda: pid is None or not process_running(pid) or time.monotonic() > limit

    def _broker_done(self, action: str) -> Wait:
        def done() -> bool:
            code = self.broker.finished()
            if code is not None and code != 0:
                raise RuntimeError(f"kafka_broker.py {action} failed ({code}): see {self.broker.directory}")
            return code is not None

        return done

    def _dovecot_kill(self, fault: Fault) -> Iterator[Wait]:
        assert self.dovecot is not None
        self.dovecot.kill()
        self.timeline.note("dovecot: killed")
        yield self._after(fault.down)
        self.dovecot.restart()
        self.timeline.note("dovecot: restarted")

    def _smtp_down(self, fault: Fault) -> Iterator[Wait]:
        assert self.smtp is not None
        pid = self.smtp.send("SIGKILL")
        self.timeline.kills.append(Kill(at=time.time(), role="smtp", pid=pid, signal="SIGKILL"))
        self.timeline.note(f"smtp server killed (pid {pid})")
        yield lambda: not self.smtp.alive  # type: ignore[union-attr]
        self.smtp.poll()
        yield self._after(fault.down)
        self._start_smtp(self.smtp_port)
        self.timeline.note("smtp server up again")

    def _log_lines(self) -> dict[str, int]:
        return {path.name: line_count(path) for path in (self.root / "logs").glob("*.log")}

    # --- the end --------------------------------------------------------------------------------------

    def _settle(self) -> bool:
        self.timeline.note(f"settling (at most {self.options.settle:g}s)")
        last_check = 0.0
        state = {"done": False}

        def complete() -> bool:
            nonlocal last_check
            if time.monotonic() - last_check < 3.0:
                return state["done"]
            last_check = time.monotonic()
            state["done"] = self._complete()
            return state["done"]

        settled = self._run_until(complete, self.options.settle)
        self.timeline.note(
            "everything accounted for" if settled else "settle timeout: not everything arrived"
        )
        if settled:
            self._run_until(lambda: False, QUIET)
        return settled

    def _complete(self) -> bool:
        copies, _ = journal_copies(read_journal(self.root / "smtp" / "journal.jsonl"))
        seen = {(c.token, c.recipient) for c in copies}
        wanted = {(m.token, r) for m in self.plan for r in m.recipients if not r.startswith("reject@")}
        if not wanted <= seen:
            return False
        rejected = {(m.token, r) for m in self.plan for r in m.recipients if r.startswith("reject@")}
        try:
            state = asyncio.run(asyncio.wait_for(self._dead_letters_only(), 60))
        except Exception as exc:
            self.timeline.note(f"settle check failed: {type(exc).__name__}: {exc}")
            return False
        return rejected <= set(state)

    async def _dead_letters_only(self) -> set[tuple[str, str]]:
        found = set()
        async for record in KafkaLog(self.broker.bootstrap).scan(self.settings.topic(DEAD_LETTERS)):
            letter = codec.decode(record.value, DeliveryDeadLettered)
            found.add((token_of(letter.routed.raw), letter.recipient))
        return found

    def _stop_stages(self) -> None:
        self.stopping = True
        for name in self.stages:
            self._signal(name, "SIGTERM")
        self._run_until(lambda: not any(p.alive for p in self.stages.values()), 20)
        for name, process in self.stages.items():
            if process.alive:
                self.timeline.note(f"{name} ignored the final SIGTERM for 20s: SIGKILL")
                process.destroy()

    def _account(self, settled: bool) -> Report:
        assert self.dovecot is not None
        kafka: KafkaState = asyncio.run(
            asyncio.wait_for(read_kafka(self.broker.bootstrap, self.settings), 300)
        )
        copies, sessions = journal_copies(read_journal(self.root / "smtp" / "journal.jsonl"))
        observations = Observations(
            expected={m.token: m.recipients for m in self.plan},
            copies=tuple(copies), sessions=sessions, kills=tuple(self.timeline.kills),
            dead_letters=kafka.dead_letters, retrying=frozenset(kafka.retrying), stuck=frozenset(kafka.stuck),
            on_pop3=frozenset(tokens_in_maildirs(self.root / "dovecot" / "mail")),
            fetched_at=kafka.fetched_at,
            endings=self._endings(), ledger=kafka.ledger,
        )  # fmt: skip
        processes = [*self.stages.values(), *([self.smtp] if self.smtp else [])]
        return build_report(
            self.options,
            self.faults,
            account(observations),
            observations,
            kafka,
            processes,
            self.timeline,
            copies,
            settled,
            self.root,
        )

    def _endings(self) -> dict[int, str]:
        """How each stage process ended, relative to its start: what a duplicate's cause refers to."""
        endings = {}
        for process in self.stages.values():
            for run in process.incarnations:
                if run.ended_at is not None:
                    how = (
                        f"{run.signal} by the harness" if run.signal else f"self-crash (exit {run.exit_code})"
                    )
                    endings[run.pid] = f"{how} {run.ended_at - run.started_at:.1f}s after its start"
        return endings

    def _destroy_everything(self) -> None:
        self.stopping = True
        for process in [*self.stages.values(), *([self.smtp] if self.smtp else [])]:
            process.destroy()
        if self.dovecot is not None:
            self.dovecot.stop()
        self.broker.stop_blocking()


def run(options: Options) -> Report:
    """Run once in a fresh directory (kept at `options.keep`, else deleted)."""
    root = Path(tempfile.mkdtemp(prefix=f"popbridge-chaos-{options.seed}-"))
    root.chmod(0o755)  # Dovecot's mail user must reach the maildirs when we are root
    try:
        return ChaosRun(options, root).execute()
    finally:
        if options.keep is not None:
            shutil.rmtree(options.keep, ignore_errors=True)
            _keep(root, options.keep)
        shutil.rmtree(root, ignore_errors=True)


def _keep(root: Path, target: Path) -> None:
    """Copy what explains a run (logs, the SMTP journal, the config, the broker's log) to `target`."""
    target.mkdir(parents=True)
    for name in ("logs", "smtp"):
        if (root / name).is_dir():
            shutil.copytree(root / name, target / name)
    for name in ("popbridge.toml", "kafka/broker.log", "dovecot/log/dovecot.log"):
        if (root / name).is_file():
            shutil.copy(root / name, target / name.replace("/", "-"))
