"""`popbridge run` as a child process against hostile POP3 servers (tests/support/hostile_pop3.py), in
embedded mode with its data in tmp: its peak RSS against endless replies, a hung mailbox beside a healthy
one, and SIGTERM / SIGINT in the middle of a fetch pass. The Fetcher in-process against the same servers
is in test_hostile_pop3.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from services.fetcher.pop3_protocol import MAX_LIST_BYTES, MAX_UIDL_BYTES
from services.fetcher.service import RETR_MARGIN
from services.runtime.settings import Mailbox
from tests.support import hostile_pop3 as hostile
from tests.support.hostile_pop3 import HostilePop3Server, Message, endless_listing, mail, mailbox
from tests.support.mail_config import delivery_to, write_mail_config
from tests.support.pipeline import without_trace_field
from tests.support.smtp import SmtpSink

pytestmark = pytest.mark.integration

POPBRIDGE = str(Path(sys.executable).with_name("popbridge"))


def _high_water_mark(pid: int, ended: threading.Event) -> int:
    """The last VmHWM (KiB) of process `pid` read before it ended."""
    peak = 0
    while not ended.wait(0.02):
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text()
            peak = max(
                [peak, *(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))]
            )
    return peak


def run_config(path: Path, smtp: SmtpSink, boxes: Sequence[Mailbox]) -> Path:
    """The mail configuration of a child run: the SMTP sink, and these single-user mailboxes."""
    # The Mailbox structs as the test built them; an unset option is left out (TOML has no null).
    entries = [{k: v for k, v in msgspec.to_builtins(box).items() if v is not None} for box in boxes]
    return write_mail_config(path, delivery=delivery_to(smtp.port, smtp.host), mailboxes=entries)


@dataclass
class Child:
    """A `popbridge run --until-idle` process; `reap` waits for it and returns its peak RSS.

    The peak is the child's VmHWM (/proc/<pid>/status: the high-water mark of its own memory since its
    exec), read every 20 ms until it exits; a high-water mark only grows, so sampling misses nothing but
    the last few ms. Not ru_maxrss: Linux carries the forking parent's high-water mark (pytest's ~90 MB)
    over the exec into the child's ru_maxrss, which would hide anything smaller.
    """

    proc: subprocess.Popen[bytes]
    output: Path

    @classmethod
    def start(cls, tmp_path: Path, config: Path, name: str = "run", *, until_idle: bool = True) -> Child:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POPBRIDGE_")}
        env.update({"POPBRIDGE_DATA_DIR": str(tmp_path / "data"), hostile.PASSWORD_ENV: hostile.PASSWORD})
        output = tmp_path / f"{name}.out"
        with output.open("wb") as sink:
            proc = subprocess.Popen(
                [POPBRIDGE, "run", *(["--until-idle"] if until_idle else []), "--config", str(config)],
                stdout=sink, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        return cls(proc, output)

    async def reap(self, limit: float = 60.0) -> tuple[int, int]:
        """(exit code, peak RSS in KiB) once the child ended; killed and failed after `limit` seconds."""
        ended = threading.Event()
        peak = asyncio.ensure_future(asyncio.to_thread(_high_water_mark, self.proc.pid, ended))
        try:
            code = await asyncio.wait_for(asyncio.to_thread(self.proc.wait), limit)
        except TimeoutError:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
            pytest.fail(f"the child did not end within {limit} s:\n{self.text}")
        finally:
            ended.set()
        return code, await peak

    @property
    def text(self) -> str:
        return self.output.read_text(errors="replace")


async def test_endless_replies_keep_the_peak_rss_of_run_near_the_limits(
    tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    cases: dict[str, HostilePop3Server] = {
        "baseline (one 2 KB message)": HostilePop3Server([Message(mail(1))]),
        "endless RETR body": HostilePop3Server([Message(mail(2), retr=hostile.endless())]),
        "endless UIDL": HostilePop3Server([Message(mail(3))], uidl_reply=endless_listing()),
        "endless LIST": HostilePop3Server([Message(mail(4))], list_reply=endless_listing()),
    }
    peaks: dict[str, int] = {}
    for n, (name, server) in enumerate(cases.items()):
        async with server:
            config = run_config(tmp_path / f"{n}.toml", smtp_sink, [mailbox(server)])
            (tmp_path / str(n)).mkdir()
            child = Child.start(tmp_path / str(n), config)
            code, peaks[name] = await child.reap()
        # The endless message is skipped as too big (the pass is fine); an endless listing fails its pass.
        assert code == (1 if "listing" in name or name.endswith(("UIDL", "LIST")) else 0), child.text
        assert ("too_big=1" in child.text) == (name == "endless RETR body")
    print("\npeak RSS of `popbridge run --until-idle` (max_message_size 1 MB):")  # the measured figures
    for name, peak in peaks.items():
        print(f"  {name:30} {peak / 1024:7.1f} MiB")
    baseline = peaks.pop("baseline (one 2 KB message)")
    limits = {
        "endless RETR body": hostile.MB + RETR_MARGIN,
        "endless UIDL": MAX_UIDL_BYTES,
        "endless LIST": MAX_LIST_BYTES,
    }
    for name, peak in peaks.items():
        assert (peak - baseline) * 1024 < 2 * limits[name] + 8 * 2**20, f"{name}: {peak} KiB vs {baseline}"


@pytest.mark.parametrize("until_idle", [True, False], ids=["run --until-idle", "run"])
async def test_a_hung_mailbox_holds_up_no_one_elses_delivery_and_sigterm_ends_the_run(
    tmp_path: Path, smtp_sink: SmtpSink, until_idle: bool
) -> None:
    hung = HostilePop3Server([Message(mail(1))], greeting=hostile.silence())
    healthy = HostilePop3Server([Message(mail(2)), Message(mail(3))])
    async with hung, healthy:
        boxes = [mailbox(hung, "hung", timeout=120.0, command_deadline=120.0), mailbox(healthy, "healthy")]
        child = Child.start(
            tmp_path, run_config(tmp_path / "run.toml", smtp_sink, boxes), until_idle=until_idle
        )
        await hung.wait_for(lambda server: server.open_sessions == 1)  # `run` spreads its first polls
        delivered = await asyncio.to_thread(smtp_sink.wait_for, 2, 60.0)
        # The copies can reach SMTP before the healthy pass's QUIT (which deletes them) under load: wait
        # for it, or the SIGTERM abandons that session and the messages rightly stay on the server.
        await asyncio.wait_for(healthy.wait_for(lambda server: server.messages == []), 60.0)
        assert hung.open_sessions == 1  # still hung: the two were delivered while it held its session
        assert child.proc.poll() is None
        child.proc.send_signal(signal.SIGTERM)
        code, _ = await child.reap(limit=30.0)  # the hung session's deadlines are 120 s away
    assert code == 0, child.text
    assert "stopped by SIGTERM" in child.text
    assert "Traceback" not in child.text
    assert len(delivered) == 2
    assert len(hung.messages) == 1  # untouched


async def test_a_signal_in_the_middle_of_a_message_abandons_it_and_loses_nothing(
    tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    slow = Message(mail(2), retr=hostile.trickle(b"+OK\r\n", 0.05))
    server = HostilePop3Server([Message(mail(1)), slow])
    async with server:
        config = run_config(
            tmp_path / "run.toml", smtp_sink, [mailbox(server, timeout=120.0, command_deadline=120.0)]
        )
        first = Child.start(tmp_path, config, "first")
        await server.wait_for(lambda s: b"RETR 2" in s.commands)
        first.proc.send_signal(signal.SIGINT)
        code, _ = await first.reap(limit=30.0)
        assert code == 130, first.text
        assert "Traceback" not in first.text
        assert len(server.messages) == 2  # no QUIT: nothing deleted, the published one included
        slow.retr = None  # the server behaves again
        second = Child.start(tmp_path, config, "second")
        code, _ = await second.reap()
    assert code == 0, second.text
    assert server.messages == []
    received = sorted(without_trace_field(m.content) for m in smtp_sink.messages)
    assert received == sorted(Message(mail(n)).content for n in (1, 2))
