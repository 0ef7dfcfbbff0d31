"""`popbridge demo` as a user runs it: a table of who got each sample message and why, in seconds, leaving
nothing behind (no temporary directory, no Dovecot process)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.demo.dovecot import dovecot_binary
from tests.support.parts import missing_part

# Both runs of the demo stay in this module, which a parallel run (pytest-xdist --dist loadfile) gives
# whole to one worker: each checks that the demo left no popbridge-demo-* in /tmp, where the other (with
# Dovecot) puts one while it runs.
pytestmark = pytest.mark.integration

POPBRIDGE = str(Path(sys.executable).with_name("popbridge"))
TIME_LIMIT = 30.0


def run_demo(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POPBRIDGE_")}
    env |= {"TMPDIR": str(tmp_path), "POPBRIDGE_KAFKA_BOOTSTRAP": "127.0.0.1:1"}  # the demo must ignore it
    started = time.monotonic()
    command = [POPBRIDGE, "demo", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=99, check=False)
    return result, time.monotonic() - started


def table(stdout: str) -> dict[str, list[tuple[str, str]]]:
    """Case -> (delivered to, why) from the printed table."""
    lines = stdout.splitlines()
    rows: dict[str, list[tuple[str, str]]] = {}
    for line in lines[2 : lines.index("")]:
        _, delivered, why, case = re.split(r"\s{2,}", line.strip())
        rows.setdefault(case, []).append((delivered, why))
    return rows


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(command)
    return found


@pytest.mark.parametrize("pop3", ["builtin", "dovecot"])
def test_the_demo_shows_who_received_each_message_and_why_and_leaves_nothing_behind(
    pop3: str, tmp_path: Path
) -> None:
    if pop3 == "dovecot" and dovecot_binary() is None:
        missing_part("dovecot is not installed: apt-get install dovecot-pop3d")
    system_tmp = Path("/tmp")  # where the demo puts Dovecot when TMPDIR does not suit it
    before = set(system_tmp.glob("popbridge-demo-*"))
    result, seconds = run_demo(tmp_path, "--pop3", pop3)

    assert result.returncode == 0, result.stderr
    assert seconds < TIME_LIMIT
    rows = table(result.stdout)
    assert rows["Bcc: dave is named only in Delivered-To"] == [
        ("dave@example.com", "delivered-to: mbox4711-dave@example.com")
    ]
    assert rows["mailing list: List-Id rule"] == [
        ("lists@example.com", "list-id: Announcements <announce.lists.example.net>")
    ]
    assert rows["forged Delivered-To: carol below the ISP's Received is ignored"] == [
        ("bob@example.com", "delivered-to: mbox4711-bob@example.com")
    ]
    assert rows["plus address: alice+shop is alice"][0][0] == "alice@example.com"
    assert rows["alias: sales is alice and bob"][0][0] == "alice@example.com, bob@example.com"
    assert rows["unknown user: zoe goes to the postmaster"][0][0] == "postmaster@example.com"
    copies = (
        rows["same message to alice and alice+party (copy 1)"]
        + rows["same message to alice and alice+party (copy 2)"]
    )
    assert sorted(delivered for delivered, _ in copies) == ["-", "alice@example.com"]
    assert ("-", "duplicate: alice@example.com got another copy") in copies
    assert "0 left on it; 8 copies delivered over SMTP, all inside example.com" in result.stdout
    assert ("Dovecot" if pop3 == "dovecot" else "built-in POP3 server") in result.stdout
    assert list(tmp_path.iterdir()) == []
    assert set(system_tmp.glob("popbridge-demo-*")) <= before
    assert processes_mentioning(str(tmp_path)) == []
