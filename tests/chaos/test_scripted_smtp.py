"""The chaos suite's SMTP server: its own process, scripted per recipient, journaling across restarts."""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.scripted_smtp import read_journal

pytestmark = pytest.mark.integration

MESSAGE = (
    b"Received: from pop by popbridge with POP3 id <0123456789abcdef0123456789abcdef>;\r\n"
    b" Mon, 07 Dec 2026 00:00:00 +0000\r\nSubject: chaos ctk-ab-000001\r\n\r\nctk-ab-000001\r\n"
)
SENDER = "bounce-ctk-ab-000001@sender.example"


class Server:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        port_file = self.directory / "port"
        port_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.scripted_smtp", "--journal", str(self.journal),
             "--port-file", str(port_file), "--port", str(self.port), "--think", "0"],
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert self.process.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not start within 20 s"
            time.sleep(0.02)
        self.port = int(port_file.read_text())

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    @property
    def journal(self) -> Path:
        return self.directory / "journal.jsonl"

    def journal_until(self, ends: int) -> list[dict[str, object]]:
        """The journal once it records `ends` closed sessions (the server notes a close after the client)."""
        deadline = time.monotonic() + 10
        while sum(1 for e in read_journal(self.journal) if e["k"] == "end") < ends:
            assert time.monotonic() < deadline, (
                f"fewer than {ends} sessions ended: {read_journal(self.journal)}"
            )
            time.sleep(0.02)
        return read_journal(self.journal)

    def send(self, *recipients: str) -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
            return client.sendmail(SENDER, list(recipients), MESSAGE)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path)
    running.start()
    try:
        yield running
    finally:
        running.kill()


def test_defer_is_refused_twice_per_message_then_accepted_even_across_a_restart(server: Server) -> None:
    assert server.send("alice@example.com", "defer@example.com") == {
        "defer@example.com": (451, b"4.2.0 scripted: try again later")
    }
    server.kill()
    server.start()  # same port, same journal: it remembers the first attempt

    with pytest.raises(smtplib.SMTPRecipientsRefused):
        server.send("defer@example.com")
    assert server.send("defer@example.com") == {}


def test_reject_is_refused_with_550(server: Server) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        server.send("reject@example.com")
    assert refused.value.recipients["reject@example.com"][0] == 550


def test_drop_loses_the_first_connection_after_data_and_journals_the_copy(server: Server) -> None:
    with pytest.raises(smtplib.SMTPServerDisconnected):
        server.send("drop@example.com")
    assert server.send("drop@example.com") == {}

    entries = server.journal_until(ends=2)
    datas = [(e["outcome"], e["rcpts"], e["token"], e["fetch_id"]) for e in entries if e["k"] == "data"]
    assert datas == [
        ("dropped", ["drop@example.com"], "ctk-ab-000001", "0123456789abcdef0123456789abcdef"),
        ("accepted", ["drop@example.com"], "ctk-ab-000001", "0123456789abcdef0123456789abcdef"),
    ]
    ends = [e["quit"] for e in entries if e["k"] == "end"]
    assert ends == [False, True]


def test_the_journal_names_the_client_process_and_whether_it_answered_the_reply(server: Server) -> None:
    server.send("alice@example.com")

    entries = server.journal_until(ends=1)
    assert next(e["client_pid"] for e in entries if e["k"] == "session") == os.getpid()
    assert [e["k"] for e in entries if e["k"] in ("data", "replied", "acked", "end")] == [
        "data",
        "replied",
        "acked",
        "end",
    ]
