"""The router's dedupe state at scale: ready-after-restart and RSS with a week of history, on disk
(services.router.state) beside the old in-memory table (faust's `memory://`), in the same run.

    .venv/bin/python bench/scale_router.py --bootstrap 127.0.0.1:9092 [--per-day 200000] [--days 7]
                                           [--sizes 20000,400000] [--full-up-to 50000]

For each history size N (entries in the window; the full target is 7 days x 200k messages/day = 1.4M),
the changelog of a fresh deployment (own topic prefix) is filled straight from a producer with N
synthetic entries, first seen spread over the window. Then one router replica is started in a child
process (so RSS is its own), three ways:

    memory     the old table: faust's memory:// store, rebuilt from the whole changelog at each start
    cold       the on-disk store without local state (a new node): the whole changelog, into SQLite
    warm       the on-disk store with the state the cold run left (a restart): only the changelog tail

Above --full-up-to entries only `warm` runs, on local state written while filling (see `fill`): faust
restores about 300 records a second here (it hands records over one by one), so a full replay of 1.4M
entries would take over an hour, for the old memory:// start as for a cold one.

"ready" is from `app.start()` to faust's Recovery reporting the table restored (the router then routes);
it includes joining the consumer group (~3 s of faust's rebalance here). RSS is VmRSS once ready, peak
VmHWM. The machine is shared (2 cores, other jobs running): the figures are this run's, not a ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from schemas.topics import TOPICS, TopicSpec  # noqa: E402 - after the path is set
from services.router.app import create_app, internal_topics  # noqa: E402
from services.router.dedupe import SeenCopy, encode_seen  # noqa: E402
from services.router.state import TABLE, open_partition_file, prune_at_ms  # noqa: E402
from services.runtime import state_table  # noqa: E402
from services.runtime.kafka import KafkaLog  # noqa: E402
from services.runtime.settings import DeploymentSettings, load_config  # noqa: E402

CONFIG = """
[delivery]
host = "127.0.0.1"
tls = "none"

[routing]
primary_domain = "example.com"
local_domains = ["example.com"]
users = ["alice", "bob"]
postmaster = "alice@example.com"

[[mailboxes]]
id = "catchall"
host = "pop.example.net"
username = "u"
password_env = "UNUSED"
"""
CHUNK = 20_000  # records in flight per producer round


def settings_for(bootstrap: str, prefix: str) -> DeploymentSettings:
    return DeploymentSettings(kafka_bootstrap=bootstrap, topic_prefix=prefix, group_prefix=prefix + "g")


def entry(n: int, now: datetime, window: timedelta) -> tuple[bytes, bytes]:
    """One synthetic dedupe entry: a Message-ID, one body, two recipients, first seen inside the window."""
    first_seen = now - window * ((n * 7919) % 1000 / 1000)
    seen = {
        f"{n:064x}": SeenCopy(
            routed_by={"alice@example.com": f"catchall:{n}-a", "bob@example.com": f"catchall:{n}-b"},
            first_seen=first_seen,
        )
    }
    return f"<{n}.{uuid.uuid4().hex[:8]}@bench.example>".encode(), encode_seen(seen)


async def fill(
    bootstrap: str, prefix: str, entries: int, window: timedelta, seed_state: Path | None = None
) -> float:
    """Create the deployment's topics and write `entries` changelog records; returns seconds taken.

    With `seed_state`, each record is also written into the local state there, as the router's store
    would have applied it (same file, same offset checkpoint): a replica restarting after it had
    routed that history. Restoring it through faust takes about as long as the memory:// start (both
    replay every record), which is not feasible at the full size on this machine."""
    settings = settings_for(bootstrap, prefix)
    log = KafkaLog(bootstrap)
    specs = [TopicSpec(settings.topic(s.name), s.partitions, dict(s.config)) for s in TOPICS]
    await log.ensure_topics([*specs, *internal_topics(settings)])
    changelog = internal_topics(settings)[1].name
    while not await log.partitions(changelog):  # noqa: ASYNC110 - a new topic shows in metadata later
        await asyncio.sleep(0.2)
    started = time.monotonic()
    now = datetime.now(UTC)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    files: dict[int, sqlite3.Connection] = {}
    prune_at = prune_at_ms(window)
    try:
        for base in range(0, entries, CHUNK):
            records = [entry(n, now, window) for n in range(base, min(base + CHUNK, entries))]
            sends = [await producer.send(changelog, key=key, value=value) for key, value in records]
            written = await asyncio.gather(*sends)
            if seed_state is not None:
                seed(files, seed_state, changelog, records, written=written, prune_at=prune_at)
    finally:
        await producer.stop()
        for conn in files.values():
            conn.close()
    return time.monotonic() - started


def seed(
    files: dict[int, sqlite3.Connection], directory: Path, changelog: str, records: list[tuple[bytes, bytes]],
    *, written: list[Any], prune_at: Any,
) -> None:
    """Apply one chunk of changelog records to the local state, with their offsets."""
    by_partition: dict[int, list[tuple[bytes, bytes | None, int]]] = {}
    last: dict[int, int] = {}
    for (key, value), meta in zip(records, written, strict=True):
        by_partition.setdefault(meta.partition, []).append((key, value, prune_at(value)))
        last[meta.partition] = max(meta.offset, last.get(meta.partition, -1))
    for partition, changes in by_partition.items():
        if partition not in files:
            files[partition] = open_partition_file(directory / f"{changelog}-{partition}.sqlite3")
        conn = files[partition]
        conn.execute("BEGIN")
        state_table.write(conn, TABLE, changes)
        state_table.set_applied_offset(conn, TABLE, partition, last[partition])
        conn.execute("COMMIT")


def rss_kib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


async def child(bootstrap: str, prefix: str, state_dir: str) -> dict[str, Any]:
    """One router start: seconds to ready, RSS, and the entries the table holds."""
    with tempfile.TemporaryDirectory() as scratch:
        config_path = Path(scratch) / "popbridge.toml"
        config_path.write_text(CONFIG)
        app = create_app(
            settings_for(bootstrap, prefix), load_config(config_path),
            state_dir=Path(state_dir) if state_dir else None,
        )
        started = time.monotonic()
        await app.start()
        tables: Any = app.tables
        await asyncio.wait_for(tables.recovery.completed.wait(), 3600)
        ready = time.monotonic() - started
        memory = rss_kib()
        seen: Any = app.tables["seen-copies"]
        entries = len(seen)
        await app.stop()
    return {"ready_s": round(ready, 2), "rss_mib": memory["VmRSS"] // 1024,
            "peak_rss_mib": memory["VmHWM"] // 1024, "entries": entries}  # fmt: skip


def run_child(bootstrap: str, prefix: str, state_dir: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--bootstrap", bootstrap, "--child", prefix, "--state", state_dir]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"child failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure(bootstrap: str, entries: int, window: timedelta, full: bool) -> dict[str, Any]:
    """`full`: memory, cold and warm (the cold run leaves the warm run's state); otherwise only warm, on
    state seeded while filling."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}-"
    with tempfile.TemporaryDirectory(prefix="router-state-") as state:
        filled = asyncio.run(fill(bootstrap, prefix, entries, window, None if full else Path(state)))
        row: dict[str, Any] = {"entries": entries, "fill_s": round(filled, 1)}
        if full:
            row["memory"] = run_child(bootstrap, prefix, "")
            row["cold"] = run_child(bootstrap, prefix, state)
        row["warm"] = run_child(bootstrap, prefix, state)
        row["disk_mib"] = sum(p.stat().st_size for p in Path(state).rglob("*") if p.is_file()) // 2**20
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default=os.environ.get("POPBRIDGE_TEST_KAFKA", "127.0.0.1:9092"))
    parser.add_argument("--per-day", type=int, default=200_000, help="messages a day (target: 200k)")
    parser.add_argument("--days", type=int, default=7, help="the dedupe window in days")
    parser.add_argument("--sizes", default="", help="history sizes to measure, e.g. 100000,400000 "
                        "(default: days x per-day)")  # fmt: skip
    parser.add_argument("--full-up-to", type=int, default=50_000, help="sizes up to this also get the "
                        "memory:// and cold figures (each replays every record through faust)")  # fmt: skip
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--state", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args.bootstrap, args.child, args.state))))
        return
    window = timedelta(days=args.days)
    sizes = [int(s) for s in args.sizes.split(",") if s] or [args.days * args.per_day]
    target = args.days * args.per_day
    print(f"target history: {args.days} days x {args.per_day} messages/day = {target} entries")
    print("entries   fill s | memory: ready s  RSS  peak (MiB) | cold: ready s  RSS  peak | warm: ready s RSS"
          "  peak | disk MiB")  # fmt: skip
    for size in sizes:
        row = measure(args.bootstrap, size, window, size <= args.full_up_to)
        cells = [f"{row['entries']:>8} {row['fill_s']:>8}"]
        for mode in ("memory", "cold", "warm"):
            m = row.get(mode)
            cells.append(f"{m['ready_s']:>7} {m['rss_mib']:>6} {m['peak_rss_mib']:>5}" if m else " " * 20)
        print(" | ".join(cells) + f" | {row['disk_mib']}")
        print(json.dumps(row))


if __name__ == "__main__":
    main()
