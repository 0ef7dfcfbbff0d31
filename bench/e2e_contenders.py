"""The end-to-end bench's contenders, each run as its own process(es) so CPU and peak RSS are its own.

Each contender drains POP3 mailboxes (one or many) into the sink; `Outcome` holds the wall time (from the
first process start to the last copy the sink accepted, or to the last process exit when that is later)
and, per process, CPU seconds (user + system) and peak RSS from `wait4`.

- naive: bench/e2e_naive.py, one mailbox after another;
- fetchmail: one rc file listing every mailbox (its usual way), single-drop (`is alice here`) or
  multidrop (`envelope Delivered-To`, `localdomains example.com`, `to * here`);
- run: `popbridge run --until-idle` on the embedded log (or on Kafka, `run-kafka`);
- stages: `popbridge router` and `popbridge deliverer` started first and waited for (/readyz), then
  `popbridge fetcher --once`; the copies are counted at the sink, then the two services are stopped.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.e2e_mail import DOMAIN, ISP_HOST, LIST_ID, LIST_TARGET, OWNER
from bench.e2e_sink import HOST, Sink, free_port

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "bench-password"  # a throwaway Dovecot on loopback
IDLE_SECONDS = 30.0  # no new copy at the sink for this long after the fetcher ended: the stages are done


@dataclass(frozen=True)
class Box:
    """One POP3 mailbox of the bench's Dovecot."""

    user: str
    port: int
    catch_all: bool


@dataclass
class Usage:
    cpu: float = 0.0
    rss_mb: float = 0.0


@dataclass
class Outcome:
    seconds: float = 0.0
    processes: dict[str, Usage] = field(default_factory=dict)
    broker_cpu: float | None = None


def popbridge() -> str:
    return str(Path(sys.executable).with_name("popbridge"))


class Child:
    """A process whose exit is reaped with wait4, for its CPU seconds and peak RSS."""

    def __init__(
        self, argv: Sequence[str], *, env: dict[str, str] | None = None, log: Path, cwd: Path = ROOT
    ) -> None:
        self.log_path = log
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            list(argv),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            cwd=cwd,
        )
        self.usage: Usage | None = None
        self.returncode: int | None = None
        self.peak_kb = 0

    def sample(self) -> None:
        """Peak RSS from /proc (VmHWM), sampled while the child runs: wait4's ru_maxrss would not do, as
        Linux carries the parent's high-water mark over the fork and exec (the bench holds every message)."""
        with contextlib.suppress(OSError, ValueError):
            for row in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if row.startswith("VmHWM:"):
                    self.peak_kb = max(self.peak_kb, int(row.split()[1]))

    def done(self) -> bool:
        if self.usage is not None:
            return True
        self.sample()
        pid, status, rusage = os.wait4(self.process.pid, os.WNOHANG)
        if pid == 0:
            return False
        self._reaped(status, rusage)
        return True

    def wait(self, timeout: float = 600.0) -> Usage:
        deadline = time.monotonic() + timeout
        while not self.done():
            if time.monotonic() > deadline:
                self.process.kill()
            time.sleep(0.02)
        assert self.usage is not None
        return self.usage

    def stop(self) -> Usage:
        if not self.done():
            self.process.send_signal(signal.SIGTERM)
        return self.wait(60)

    def _reaped(self, status: int, rusage: resource.struct_rusage) -> None:
        self.returncode = self.process.returncode = os.waitstatus_to_exitcode(status)
        self.usage = Usage(cpu=rusage.ru_utime + rusage.ru_stime, rss_mb=self.peak_kb / 1024)
        self._log.close()


def _wait_all(children: dict[str, Child], sink: Sink, started: float) -> Outcome:
    """Wait for every child; the time ends at the later of the last exit and the last copy recorded."""
    last_count, last_change = sink.recorded(), time.perf_counter()
    while True:
        exited = [child.done() for child in children.values()]  # each call samples that child's RSS
        if all(exited):
            break
        time.sleep(0.05)
        if (count := sink.recorded()) != last_count:
            last_count, last_change = count, time.perf_counter()
    ended = time.perf_counter()
    if sink.recorded() != last_count:
        last_change = ended
    outcome = Outcome(seconds=max(ended, last_change) - started)
    for name, child in children.items():
        assert child.usage is not None
        outcome.processes[name] = child.usage
        if child.returncode not in (0, 1):  # fetchmail: 1 = no mail, after a pass that found some
            tail = child.log_path.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{name} exited with {child.returncode}:\n" + "\n".join(tail))
    return outcome


# --- naive and fetchmail ---------------------------------------------------------------------------


def naive(boxes: Sequence[Box], sink: Sink, work: Path) -> Outcome:
    started = time.perf_counter()
    children = {}
    for box in boxes:  # one after another, as a loop over mailboxes would
        argv = [sys.executable, "-m", "bench.e2e_naive", str(box.port), box.user, PASSWORD, str(sink.port)]
        child = Child(argv + (["--catch-all"] if box.catch_all else []), log=work / "naive.log")
        child.wait()
        children[f"naive.{box.user}" if len(boxes) > 1 else "naive"] = child
    outcome = _wait_all(children, sink, started)
    if len(boxes) > 1:  # one line for the lot: the largest peak, the CPU summed
        usages = outcome.processes.values()
        outcome.processes = {"naive": Usage(sum(u.cpu for u in usages), max(u.rss_mb for u in usages))}
    return outcome


def fetchmail_rc(boxes: Sequence[Box], sink: Sink) -> str:
    lines = [f"set no syslog\nset postmaster postmaster@{DOMAIN}\n"]
    for box in boxes:
        common = (
            f"poll {HOST} protocol pop3 port {box.port} timeout 300\n"
            f"  envelope Delivered-To localdomains {DOMAIN}\n"
            if box.catch_all
            else f"poll {HOST} protocol pop3 port {box.port} timeout 300\n"
        )
        who = "to * here" if box.catch_all else f"is {OWNER.split('@')[0]} here"
        lines.append(
            common + f'  user "{box.user}" there with password "{PASSWORD}" {who}\n'
            f"  smtphost {HOST}/{sink.port} smtpaddress {DOMAIN} fetchall nokeep sslproto ''\n"
        )
    return "".join(lines)


def fetchmail(boxes: Sequence[Box], sink: Sink, work: Path) -> Outcome:
    binary = shutil.which("fetchmail")
    if binary is None:
        raise SystemExit("fetchmail is not installed (bench/e2e.py --setup installs it from Debian)")
    rc = work / "fetchmailrc"
    rc.write_text(fetchmail_rc(boxes, sink))
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(work), "FETCHMAILHOME": str(work)}
    started = time.perf_counter()
    child = Child(
        [binary, "-f", str(rc), "--nodetach", "--nosyslog", "-s"], env=env, log=work / "fetchmail.log"
    )
    return _wait_all({"fetchmail": child}, sink, started)


# --- popbridge -----------------------------------------------------------------------------------------


def popbridge_config(boxes: Sequence[Box], sink: Sink, connections: int) -> str:
    # Top-level keys first: TOML puts whatever follows a [table] header inside that table.
    parts = [
        f"max_parallel_mailboxes = {min(len(boxes), 16)}\n",
        f'[delivery]\nhost = "{HOST}"\nport = {sink.port}\ntls = "none"\nconnections = {connections}\n',
        f'[routing]\nprimary_domain = "{DOMAIN}"\nlocal_domains = ["{DOMAIN}"]\n'
        f'postmaster = "postmaster@{DOMAIN}"\ntrusted_received_hosts = ["{ISP_HOST}"]\n'
        f'list_rules = [{{ list_id = "{LIST_ID}", deliver_to = "{LIST_TARGET}" }}]\n',
    ]
    for box in boxes:  # a catch-all mailbox takes the [routing] table
        parts.append(
            f'[[mailboxes]]\nid = "{box.user}"\nhost = "{HOST}"\nport = {box.port}\ntls = "none"\n'
            f'username = "{box.user}"\npassword_env = "BENCH_POP3_PASSWORD"\n'
            f"max_connections_per_host = 16\n" + ("" if box.catch_all else f'recipients = ["{OWNER}"]\n')
        )
    return "".join(parts)


def _environment(work: Path, kafka: str | None, prefix: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("POPBRIDGE_")}
    env.update(
        BENCH_POP3_PASSWORD=PASSWORD,
        POPBRIDGE_DATA_DIR=str(work / "data"),
        POPBRIDGE_LOG_LEVEL="WARNING",
        POPBRIDGE_TOPIC_PREFIX=prefix,
        POPBRIDGE_GROUP_PREFIX=prefix.rstrip("-"),
    )
    if kafka:
        env["POPBRIDGE_KAFKA_BOOTSTRAP"] = kafka
    return env


def run(boxes: Sequence[Box], sink: Sink, work: Path, *, kafka: str | None, connections: int) -> Outcome:
    config = work / "popbridge.toml"
    config.write_text(popbridge_config(boxes, sink, connections))
    env = _environment(work, kafka, f"e2e-{work.name}-")
    started = time.perf_counter()
    child = Child(
        [popbridge(), "run", "--until-idle", "--config", str(config)], env=env, log=work / "run.log", cwd=work
    )
    return _wait_all({"run": child}, sink, started)


def _ready(port: int) -> bool:
    url = f"http://{HOST}:{port}/readyz"
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
        return bool(response.status == 200)
    return False


def stages(
    boxes: Sequence[Box],
    sink: Sink,
    work: Path,
    *,
    kafka: str,
    connections: int,
    expected: int,
    broker_cpu: Callable[[], float],
) -> Outcome:
    """One process per stage on Kafka; done when the sink has `expected` copies (or none came for a while)."""
    config = work / "popbridge.toml"
    config.write_text(popbridge_config(boxes, sink, connections))
    env = _environment(work, kafka, f"e2e-{work.name}-")
    subprocess.run(
        [popbridge(), "topics", "create"], env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL
    )
    services: dict[str, Child] = {}
    for stage in ("router", "deliverer"):
        port = free_port()
        services[stage] = Child(
            [popbridge(), stage, "--config", str(config)],
            env={**env, "POPBRIDGE_HTTP_PORT": str(port)},
            log=work / f"{stage}.log",
            cwd=work,
        )
        deadline = time.monotonic() + 180
        while not _ready(port):
            if services[stage].done() or time.monotonic() > deadline:
                raise RuntimeError(f"popbridge {stage} did not become ready; see {work}/{stage}.log")
            time.sleep(0.2)
    cpu_before, broker_before = {n: _cpu_so_far(c) for n, c in services.items()}, broker_cpu()
    started = time.perf_counter()
    fetcher = Child(
        [popbridge(), "fetcher", "--once", "--config", str(config)],
        env=env,
        log=work / "fetcher.log",
        cwd=work,
    )
    last_count, last_change = 0, time.perf_counter()
    while True:
        time.sleep(0.05)
        for child in services.values():
            child.sample()
        if (count := sink.recorded()) != last_count:
            last_count, last_change = count, time.perf_counter()
        if fetcher.done() and (count >= expected or time.perf_counter() - last_change > IDLE_SECONDS):
            break
    outcome = Outcome(seconds=last_change - started, broker_cpu=broker_cpu() - broker_before)
    outcome.processes["fetcher"] = fetcher.wait()
    for name, child in services.items():
        usage = child.stop()
        outcome.processes[name] = Usage(cpu=usage.cpu - cpu_before[name], rss_mb=usage.rss_mb)
    return outcome


def _cpu_so_far(child: Child) -> float:
    """CPU seconds a running child used so far (its start-up, left out of the figures), from /proc."""
    fields = Path(f"/proc/{child.process.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
