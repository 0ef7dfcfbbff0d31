"""The OS processes of a chaos run: stage replicas, the scripted SMTP server and the Kafka broker.

Every process starts in its own session (process group), writes its output to its own file, and is
killed by group: nothing outlives the run. No call here blocks for long; the harness polls.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BROKER_SCRIPT = REPO / "deploy" / "local" / "kafka_broker.py"
HOST = "127.0.0.1"
STOP_GRACE = 15.0  # seconds a SIGTERM'd process may take before it gets SIGKILL (and a finding)


def free_port() -> int:
    """A loopback port that was free a moment ago.

    The stages bind their health port themselves from POPBRIDGE_HTTP_PORT, so this is pick-then-bind:
    the harness notices a process that exits because its port was taken and starts it on a new one.
    """
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Incarnation:
    """One start of a process: its pid, its log, how it ended and whether the harness caused it."""

    number: int
    pid: int
    started_at: float
    log: Path
    signal: str = ""  # the signal the harness sent ("" if none)
    signalled_at: float = 0.0
    ended_at: float | None = None
    exit_code: int | None = None


@dataclass
class Managed:
    """A process the harness starts and restarts under one name (e.g. "router-2")."""

    name: str
    role: str  # fetcher, router, deliverer, smtp
    command: list[str]
    env: dict[str, str]
    log_dir: Path
    incarnations: list[Incarnation] = field(default_factory=list)
    _process: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.alive and self._process is not None else None

    @property
    def current(self) -> Incarnation | None:
        return self.incarnations[-1] if self.incarnations else None

    def start(self) -> Incarnation:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        number = len(self.incarnations)
        log = self.log_dir / f"{self.name}.{number}.log"
        with log.open("wb") as output:
            self._process = subprocess.Popen(
                self.command, env=self.env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        incarnation = Incarnation(number=number, pid=self._process.pid, started_at=time.time(), log=log)
        self.incarnations.append(incarnation)
        return incarnation

    def send(self, signame: str) -> int | None:
        """Signal the process group; returns the pid signalled (None if it was not running)."""
        process, current = self._process, self.current
        if process is None or current is None or process.poll() is not None:
            return None
        current.signal, current.signalled_at = signame, time.time()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, getattr(signal, signame))
        return process.pid

    def poll(self) -> Incarnation | None:
        """The incarnation that has just ended (once), or None."""
        process, current = self._process, self.current
        if process is None or current is None or process.poll() is None:
            return None
        self._process = None
        current.exit_code, current.ended_at = process.returncode, time.time()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # stray children of the group
        return current

    def overdue(self) -> bool:
        """SIGTERM'd more than STOP_GRACE seconds ago and still running."""
        current = self.current
        return bool(
            self.alive
            and current
            and current.signal == "SIGTERM"
            and time.time() - current.signalled_at > STOP_GRACE
        )

    def destroy(self) -> None:
        """SIGKILL the group and reap it (the end of the run)."""
        process, current = self._process, self.current
        if process is None or current is None:
            return
        if not current.signal:
            current.signal, current.signalled_at = "SIGKILL", time.time()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self.poll()


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def process_running(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


class Broker:
    """The run's own Kafka broker (deploy/local/kafka_broker.py) in `directory`: stop and start it again."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.bootstrap = ""
        self._command: subprocess.Popen[bytes] | None = None

    def start_blocking(self, timeout: float = 600.0) -> str:
        result = subprocess.run(
            self._argv("start"), capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"the chaos broker did not start: {result.stderr.strip()[-2000:]}")
        self.bootstrap = result.stdout.strip().splitlines()[-1]
        return self.bootstrap

    def pid(self) -> int | None:
        """The broker process's pid (DIR/broker.pid, written by kafka_broker.py start), None if unknown."""
        try:
            return int((self.directory / "broker.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def begin(self, action: str) -> None:
        """Start `kafka_broker.py stop|start` without waiting; `finished()` says when it is done."""
        output = (self.directory / f"{action}.out").open("ab")
        with output:
            self._command = subprocess.Popen(
                self._argv(action),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def finished(self) -> int | None:
        """The exit code of the command begun last, once it has ended."""
        command = self._command
        if command is None or command.poll() is None:
            return None
        self._command = None
        return command.returncode

    def stop_blocking(self) -> None:
        if self._command is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._command.pid, signal.SIGKILL)
            self._command.wait()
            self._command = None
        subprocess.run(self._argv("stop"), capture_output=True, timeout=60, check=False)

    def _argv(self, action: str) -> list[str]:
        extra = ["--heap", "512m"] if action == "start" else []
        return [sys.executable, str(BROKER_SCRIPT), action, "--dir", str(self.directory), *extra]
