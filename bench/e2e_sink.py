"""The end-to-end bench's SMTP sinks: each records every (message, recipient) it accepted.

`smtp-sink` (Postfix's, in C: not the bottleneck) appends each mail transaction to one dump file with
`-D`: its envelope as `X-Rcpt-Args: <address>` lines, then the message; the scoring reads the recipients
and the bench Message-ID of each transaction back from it. `aiosmtpd` (Python, tops out near 200 msg/s
here) runs in its own process and writes one `index<TAB>recipient` line per accepted recipient.

    python -m bench.e2e_sink PORT RECORDS    # the aiosmtpd sink's process
"""

from __future__ import annotations

import itertools
import mmap
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from bench.e2e_mail import Pair, message_index

HOST = "127.0.0.1"
# Searched with bytes.find/count (C, memchr-fast): a multiline regex over 200 MB of dump took minutes of
# the bench's CPU on two contended cores, CPU the contenders then did not get.
_TRANSACTION = b"\nX-Client-Addr: "
_RCPT_LINE = b"\nX-Rcpt-Args: "
_RCPT = re.compile(rb"(?m)^X-Rcpt-Args: <([^>]*)>")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Sink(Protocol):
    port: int

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def recorded(self) -> int:
        """(message, recipient) records so far: cheap enough to call a few times a second."""
        ...

    def pairs(self) -> list[Pair]:
        """Every (message index, recipient) accepted, once per acceptance."""
        ...


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the sink on port {port} did not start")


class _SinkProcess:
    """A sink in a child process on a free loopback port, under `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def _launch(self, argv: list[str], cwd: Path | None = None) -> None:
        self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, cwd=cwd)
        _wait_for_port(self.port, self._process)

    def stop(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGTERM)
            self._process.wait(10)
            self._process = None


class PostfixSink(_SinkProcess):
    """Postfix's smtp-sink, dumping every transaction into `directory/dump`."""

    name = "smtp-sink"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self._seen = 0
        self._count = 0

    @property
    def dump(self) -> Path:
        return self.directory / "dump"

    def start(self) -> None:
        binary = shutil.which("smtp-sink", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
        if binary is None:
            raise SystemExit("smtp-sink not found: it comes with Debian's postfix package (see tests/run.sh)")
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [binary, "-D", str(self.dump), f"{HOST}:{self.port}", "256"]
        if os.geteuid() == 0:  # smtp-sink refuses to run as root without -u
            shutil.chown(self.directory, "nobody")
            command[1:1] = ["-u", "nobody"]
        self._launch(command)

    def recorded(self) -> int:
        """Reads only what was appended since the last call, from the newline that ended the last line read
        (the one before an `X-Rcpt-Args` line belongs to the search); a line still being written waits."""
        if not self.dump.exists():
            return 0
        start = max(self._seen - 1, 0)
        with self.dump.open("rb") as file:
            file.seek(start)
            chunk = file.read()
        end = chunk.rfind(b"\n") + 1
        if start + end > self._seen:
            self._count += chunk[:end].count(_RCPT_LINE)
            self._seen = start + end
        return self._count

    def pairs(self) -> list[Pair]:
        if not self.dump.exists() or self.dump.stat().st_size == 0:
            return []
        with self.dump.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            starts = [0]  # the dump starts with a transaction
            while (at := data.find(_TRANSACTION, starts[-1] + 1)) >= 0:
                starts.append(at + 1)
            starts.append(len(data))
            found: list[Pair] = []
            for begin, end in itertools.pairwise(starts):
                head = data[begin : min(end, begin + 16384)]
                index = message_index(head)
                found += [(-1 if index is None else index, r.decode().lower()) for r in _RCPT.findall(head)]
        return found


class AiosmtpdSink(_SinkProcess):
    """aiosmtpd in a child process, writing one line per accepted (message, recipient)."""

    name = "aiosmtpd"

    @property
    def records(self) -> Path:
        return self.directory / "records.tsv"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.records.touch()
        root = Path(__file__).resolve().parents[1]
        self._launch([sys.executable, "-m", "bench.e2e_sink", str(self.port), str(self.records)], cwd=root)

    def recorded(self) -> int:
        with self.records.open("rb") as file:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))

    def pairs(self) -> list[Pair]:
        lines = self.records.read_text().splitlines()
        return [(int(index), rcpt.lower()) for index, rcpt in (line.split("\t") for line in lines)]


class _Recorder:
    def __init__(self, path: Path) -> None:
        self._file = path.open("a", buffering=1)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 -- aiosmtpd's name
        index = message_index(bytes(envelope.content[:16384]))
        for rcpt in envelope.rcpt_tos:
            self._file.write(f"{-1 if index is None else index}\t{rcpt}\n")
        return "250 2.0.0 OK"


def _serve(port: int, records: Path) -> None:
    from aiosmtpd.controller import Controller  # noqa: PLC0415 -- only the sink's own process needs it

    controller = Controller(
        _Recorder(records),
        hostname=HOST,
        port=port,
        decode_data=False,
        data_size_limit=64 * 1024 * 1024,
        server_hostname="sink.bench",
    )
    controller.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    controller.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    _serve(int(sys.argv[1]), Path(sys.argv[2]))
