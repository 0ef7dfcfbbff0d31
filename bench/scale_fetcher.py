"""The fetcher at hosting-provider scale: 1,000 keep-mode mailboxes on one Dovecot, their fetch state
holding `--uidls` kept UIDLs each, beside the old code (a checkout given by --old-tree) in the same run.

    .venv/bin/python bench/scale_fetcher.py --kafka HOST:PORT [--mailboxes 1000] [--uidls 10000]
        [--old-tree /tmp/popbridge-old]   # git worktree add --detach /tmp/popbridge-old <old commit>

Setup: Dovecot (services.demo.dovecot, its own config dir) with `--mailboxes` users, one message each;
one fetcher pass publishes them; then `--uidls - 1` more FetchRecorded per mailbox go to the fetch-state
topic (synthetic kept UIDLs the server no longer lists, as after months of keep mode). Each figure is
then measured in a fresh child process (so RSS is its own): start (memory loaded) to the end of the first
poll cycle over every mailbox (no new mail), a second cycle, and the child's peak RSS (VmHWM).
- new, first start: the fetch-state store is built from the whole topic (an empty data dir);
- new, restart: the store survived, only the tail is read (the target: <= 30 s, cycle <= 10 s, 300 MB);
- old: the old code reads the whole topic into Python dicts at every start.
Numbers on a shared, contended 2-core machine: compare within one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import poplib
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from scale_common import vm_hwm_mb

from schemas import codec
from schemas.events import FetchRecorded, fetch_state_key
from schemas.topics import FETCH_STATE, FETCHED, TopicSpec, topic_spec
from services.demo.dovecot import Dovecot, new_root
from services.fetcher import commands
from services.fetcher.service import Fetcher
from services.runtime.kafka import KafkaLog
from services.runtime.log import Outgoing
from services.runtime.settings import DeploymentSettings, Mailbox

PASSWORD = "bench-password"
CHUNK = 5000


def mailboxes(host: str, port: int, count: int, parallel: int) -> list[Mailbox]:
    """Keep-mode mailboxes on one host (a hosting provider's server): as many connections to it as
    max_parallel_mailboxes allows (max_connections_per_host defaults to 2, for an ISP's server)."""
    return [
        Mailbox(id=f"m{n:04d}", host=host, port=port, tls="none", username=f"user{n:04d}",
                password_env="PW", mode="keep", recipients=("a@example.com",), timeout=30.0,
                max_connections_per_host=parallel)
        for n in range(count)
    ]  # fmt: skip


# A hosting provider's Dovecot reuses its login and pop3 processes ("high-performance mode"). The test
# configuration (services/demo/dovecot_config.py) starts one of each per connection, ~80 ms of CPU per
# session here: 1,000 sessions cost Dovecot alone ~80 s a cycle, whoever the client.
REUSE_PROCESSES = """
service pop3-login {
  service_count = 0
  process_min_avail = 2
}
service pop3 {
  service_count = 0
  process_min_avail = 4
}
"""


class HostingDovecot(Dovecot):
    """The test Dovecot with its processes reused (`--dovecot-per-connection` keeps the test one)."""

    def _launch(self, config: Path) -> bool:
        config.write_text(config.read_text() + REUSE_PROCESSES)
        return super()._launch(config)


def poplib_cycle(port: int, count: int, parallel: int) -> float:
    """The baseline: USER/PASS, UIDL, LIST, QUIT on every mailbox with poplib, `parallel` threads."""

    def session(n: int) -> None:
        client = poplib.POP3("127.0.0.1", port, timeout=30)
        client.user(f"user{n:04d}")
        client.pass_(PASSWORD)
        client.uidl()
        client.list()
        client.quit()

    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(session, range(count)))
    return time.perf_counter() - started


async def child(args: argparse.Namespace) -> None:
    """One measured start: memory loaded, two poll cycles; prints a JSON line."""
    started = time.perf_counter()
    settings = DeploymentSettings(
        kafka_bootstrap=args.kafka, topic_prefix=args.prefix, data_dir=args.data_dir
    )
    log = KafkaLog(args.kafka)
    boxes = mailboxes("127.0.0.1", args.port, args.mailboxes, args.parallel)
    cycles: list[float] = []
    cpu: list[float] = []  # this process's CPU seconds per cycle: what contention does not inflate
    loaded = loaded_cpu = 0.0

    async def poll(memory: object) -> None:
        nonlocal loaded, loaded_cpu
        loaded, loaded_cpu = time.perf_counter() - started, time.process_time()
        async with log.producer() as producer:
            fetcher = Fetcher(settings=settings, producer=producer, memory=memory,  # type: ignore[arg-type]
                              environ={"PW": PASSWORD}, max_parallel_mailboxes=args.parallel)  # fmt: skip
            for _ in range(2):
                cycle, cycle_cpu = time.perf_counter(), time.process_time()
                results = await fetcher.poll_all(boxes)
                cycles.append(time.perf_counter() - cycle)
                cpu.append(time.process_time() - cycle_cpu)
                failed = [r for r in results if r.error]
                if failed or sum(r.published for r in results):
                    raise SystemExit(
                        f"unexpected: {failed[:1]} {sum(r.published for r in results)} published"
                    )

    if hasattr(commands, "open_fetch_memory"):
        async with commands.open_fetch_memory(log, settings) as memory:
            await poll(memory)
    else:  # the old code
        await poll(await commands.load_memory(log, settings))
    print(json.dumps({"loaded_s": loaded, "first_cycle_s": cycles[0], "second_cycle_s": cycles[1],
                      "start_to_first_poll_s": loaded + cycles[0], "rss_mb": vm_hwm_mb(),
                      "loaded_cpu_s": loaded_cpu, "second_cycle_cpu_s": cpu[1]}))  # fmt: skip


def measure(args: argparse.Namespace, port: int, prefix: str, data_dir: str, tree: Path) -> dict[str, float]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--kafka", args.kafka,
               "--port", str(port), "--prefix", prefix, "--data-dir", data_dir,
               "--mailboxes", str(args.mailboxes),
               "--parallel", str(args.parallel)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        command, cwd=tree, env=env, capture_output=True, text=True, check=False, timeout=3600
    )
    if done.returncode != 0:
        raise SystemExit(f"child in {tree} failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def fill_state(log: KafkaLog, topic: str, count: int, uidls: int) -> float:
    """uidls - 1 synthetic kept UIDLs per mailbox (the real one was published by the first pass)."""
    started = time.perf_counter()
    now = datetime.now(UTC)
    async with log.producer() as producer:
        batch: list[Outgoing] = []
        for n in range(count):
            for k in range(1, uidls):
                record = FetchRecorded(mailbox_id=f"m{n:04d}", uidl=f"kept{k:08d}",
                                       fetch_id=f"{n:04d}{k:028d}", size=4000, sha256="0" * 64,
                                       published_at=now)  # fmt: skip
                batch.append(
                    Outgoing(topic, codec.encode(record), fetch_state_key(record.mailbox_id, record.uidl))
                )
                if len(batch) >= CHUNK:
                    await producer.send_all(batch)
                    batch = []
        if batch:
            await producer.send_all(batch)
    return time.perf_counter() - started


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-scale-fetcher-"))
    prefix = f"bench-{uuid.uuid4().hex[:6]}-"
    log = KafkaLog(args.kafka)
    settings = DeploymentSettings(kafka_bootstrap=args.kafka, topic_prefix=prefix)
    specs = [topic_spec(name) for name in (FETCHED, FETCH_STATE)]
    await log.ensure_topics([TopicSpec(settings.topic(s.name), s.partitions, s.config) for s in specs])
    server = Dovecot if args.dovecot_per_connection else HostingDovecot
    with server(new_root("bench-scale-fetcher-dovecot-")) as dovecot:  # a root its mail user can enter
        started = time.perf_counter()
        for n in range(args.mailboxes):
            dovecot.add_user(f"user{n:04d}", PASSWORD)
            dovecot.deliver(f"user{n:04d}", f"Subject: {n}\r\nTo: a@example.com\r\n\r\nHi.\r\n".encode())
        print(
            f"setup: {args.mailboxes} Dovecot users, one message each: {time.perf_counter() - started:.1f} s"
        )
        boxes = mailboxes(dovecot.host, dovecot.pop3_port, args.mailboxes, args.parallel)
        async with commands.open_fetch_memory(log, settings) as memory, log.producer() as producer:
            fetcher = Fetcher(settings=settings, producer=producer, memory=memory, environ={"PW": PASSWORD},
                              max_parallel_mailboxes=args.parallel)  # fmt: skip
            started = time.perf_counter()
            results = await fetcher.poll_all(boxes)
            print(f"setup: first pass published {sum(r.published for r in results)} in "
                  f"{time.perf_counter() - started:.1f} s")  # fmt: skip
        filled = await fill_state(log, settings.topic(FETCH_STATE), args.mailboxes, args.uidls)
        total = args.mailboxes * args.uidls
        print(f"setup: fetch state of {total:,} records ({args.uidls} per mailbox) written in {filled:.1f} s")
        here = Path(__file__).resolve().parents[1]  # noqa: ASYNC240 - once, before the runs
        data_dir = str(root / "data")
        runs = [("new, first start (store built from the topic)", here, data_dir),
                ("new, restart (store kept: tail only)", here, data_dir)]  # fmt: skip
        if args.old_tree:
            runs.append(("old (whole topic into Python dicts)", Path(args.old_tree), ""))
        baseline = poplib_cycle(dovecot.pop3_port, args.mailboxes, args.parallel)
        print(f"baseline: poplib USER/PASS+UIDL+LIST+QUIT, {args.parallel} threads: {baseline:.1f} s a cycle")
        print(
            f"{'':48} {'loaded s':>9} {'1st cycle':>9} {'2nd cycle':>9} {'start->polled':>13} {'RSS MB':>7}"
            f" {'load CPU s':>10} {'2nd cycle CPU s':>15}"
        )
        for name, tree, directory in runs:
            r = measure(args, dovecot.pop3_port, prefix, directory, tree)
            print(f"{name:48} {r['loaded_s']:9.1f} {r['first_cycle_s']:9.1f} {r['second_cycle_s']:9.1f} "
                  f"{r['start_to_first_poll_s']:13.1f} {r['rss_mb']:7.0f} {r['loaded_cpu_s']:10.1f} "
                  f"{r['second_cycle_cpu_s']:15.1f}")  # fmt: skip
        size = sum(f.stat().st_size for f in Path(data_dir).glob("fetch-state.sqlite3*"))  # noqa: ASYNC240
        print(f"store on disk: {size / 1e6:.0f} MB ({size / total:.0f} B/record)")
    print(
        f"({args.mailboxes} mailboxes, max_parallel_mailboxes={args.parallel}; "
        "shared contended 2-core machine)"
    )


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kafka", required=True)
    parser.add_argument("--mailboxes", type=int, default=1000)
    parser.add_argument("--uidls", type=int, default=10_000)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--old-tree", default="")
    parser.add_argument("--dovecot-per-connection", action="store_true", help="the test Dovecot's config")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default="", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still stops its Dovecot
    arguments = parse()
    asyncio.run(child(arguments) if arguments.child else main(arguments))
