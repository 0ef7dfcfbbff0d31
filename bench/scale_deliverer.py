"""Scale benchmark of the deliverer's ledger (issue 16): restore time and memory against the ledger's size.

    .venv/bin/python bench/scale_deliverer.py --kafka HOST:PORT [--pairs 1000000] [--small 250000]
        [--partitions 12]

Fills a fresh ledger topic (12 partitions, as schemas.topics.DELIVERY_PARTITIONS) on a real broker with
`--pairs` synthetic RecipientDelivered records, written with the producer (not through the pipeline),
spread over the partitions by key as Kafka's partitioner does (scale_common.fill). Then, each in a fresh
process (so its peak RSS is its own), and in the same run:

  before       the old code path: the whole topic read into a Python set (services.deliverer.ledger before
               issue 16, which every replica did at start), its time and peak RSS;
  cold-third   the new path for a replica with no local state that owns 4 of the 12 partitions: restore
               them from the changelog into a fresh store, and 10,000 lookups;
  warm-third   that replica restarted with its store: only the tail past the checkpoints, 10,000 lookups;
  cold-all     the same for all 12 partitions (this builds the store the next row restarts from);
  warm-all     a restart with the local state present: open the store, restore all 12 partitions (only
               the tail past the checkpoints), 10,000 lookups (`--replica-only` skips these two);
and the rows again with `--small` pairs, to show that memory does not grow with the history. "Ready" is
the ledger's restore finished, the deliverer's part of a start; the group join
(a few seconds on Kafka) comes on top in both the old and the new path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from scale_common import Keyed, vm_hwm_mb
from scale_common import fill as fill_topic

from schemas.codec import decode, encode
from schemas.events import RecipientDelivered
from schemas.topics import DELIVERED, DELIVERY_PARTITIONS, TopicSpec, topic_spec
from services.deliverer.ledger import Ledger, ledger_key
from services.deliverer.store import open_store
from services.runtime.kafka import KafkaLog

LOOKUPS = 10_000


def fetch_id(i: int) -> str:
    """A fetch id as the fetcher makes them (32 hex digits), spread, cheap to make again for lookups."""
    return f"{(i * 0x9E3779B97F4A7C15) % 2**64:016x}{i:016x}"


def ledger_records(pairs: int, at: datetime) -> Iterator[Keyed]:
    """`pairs` ledger records as the deliverer writes them (keyed by fetch id + recipient)."""
    for i in range(pairs):
        entry = RecipientDelivered(fetch_id=fetch_id(i), recipient=f"user{i % 97}@example.com",
                                   delivered_at=at)
        yield Keyed(ledger_key(entry.fetch_id, entry.recipient), encode(entry))


async def fill(bootstrap: str, topic: str, pairs: int, partitions: int) -> float:
    """Write `pairs` ledger records, uncompressed as the deliverer writes them (scale_common.fill: batches
    straight to the broker, ~10x the rate of a future per record); returns the seconds it took."""
    log = KafkaLog(bootstrap)
    await log.ensure_topics([TopicSpec(topic, partitions, dict(topic_spec(DELIVERED).config))])
    stats = await fill_topic(bootstrap, topic, ledger_records(pairs, datetime.now(UTC)), compression=None)
    return stats.seconds


async def before(bootstrap: str, topic: str, partitions: int) -> dict[str, float]:
    """The old path: every record of the topic decoded into one set."""
    log = KafkaLog(bootstrap)
    started = time.monotonic()
    pairs: set[tuple[str, str]] = set()
    async for batch in log.read_from(topic, dict.fromkeys(range(partitions), 0)):
        for record in batch:
            entry = decode(record.value, RecipientDelivered)
            pairs.add((entry.fetch_id, entry.recipient))
    return {"seconds": time.monotonic() - started, "pairs": len(pairs)}


async def after(bootstrap: str, topic: str, state: Path, owned: list[int], pairs: int) -> dict[str, float]:
    """The new path: open the store, restore the owned partitions, then answer lookups."""
    log = KafkaLog(bootstrap)
    started = time.monotonic()
    store = open_store(state, topic)
    ledger = Ledger(log, store, retention_ms=30 * 86_400_000, now_ms=lambda: int(time.time() * 1000))
    await ledger.own(owned)
    ready = time.monotonic() - started
    draw = random.Random(7)
    hits = 0
    lookup_started = time.monotonic()
    for _ in range(LOOKUPS):
        i = draw.randrange(pairs)
        hits += ledger.delivered(fetch_id(i), f"user{i % 97}@example.com")
    lookups = time.monotonic() - lookup_started
    stored = store.count()
    store.close()
    return {"seconds": ready, "lookup_us": lookups / LOOKUPS * 1e6, "hits": hits, "stored": stored}


def phase(argv: list[str]) -> None:
    """One measurement, in this (fresh) process; prints one JSON line with its peak RSS."""
    name, bootstrap, topic, partitions = argv[0], argv[1], argv[2], int(argv[3])
    if name == "before":
        result = asyncio.run(before(bootstrap, topic, partitions))
    else:
        state, owned, pairs = Path(argv[4]), [int(p) for p in argv[5].split(",")], int(argv[6])
        result = asyncio.run(after(bootstrap, topic, state, owned, pairs))
    result["rss_mb"] = vm_hwm_mb()
    print(json.dumps(result))


def run_phase(*args: object) -> dict[str, float]:
    command = [sys.executable, __file__, "--phase", *map(str, args)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


def row(label: str, pairs: int, result: dict[str, float]) -> None:
    extra = f"  lookup {result['lookup_us']:.0f} us" if "lookup_us" in result else ""
    print(f"{label:<48} {pairs:>10,} pairs  ready {result['seconds']:7.1f} s"
          f"  peak RSS {result['rss_mb']:6.0f} MB{extra}", flush=True)


def measure(
    bootstrap: str, pairs: int, partitions: int, scratch: Path, *, with_before: bool, with_all: bool
) -> None:
    topic = f"bench-{uuid.uuid4().hex[:8]}-{DELIVERED}"
    seconds = asyncio.run(fill(bootstrap, topic, pairs, partitions))
    print(f"filled {topic}: {pairs:,} pairs over {partitions} partitions in {seconds:.1f} s "
          f"({pairs / seconds:,.0f}/s)", flush=True)
    if with_before:
        result = run_phase("before", bootstrap, topic, partitions)
        row("before: whole topic into a set (old path)", pairs, result)
    third = ",".join(str(p) for p in range(partitions // 3))
    everything = ",".join(str(p) for p in range(partitions))
    owned = f"{partitions // 3} of {partitions} partitions"
    replica = scratch / f"{topic}-third.sqlite3"
    row(f"after: no local state, {owned}", pairs, run_phase("after", bootstrap, topic, partitions, replica,
                                                           third, pairs))
    warm = run_phase("after", bootstrap, topic, partitions, replica, third, pairs)
    row(f"after: restart with local state, {owned}", pairs, warm)
    stored = int(warm["stored"])
    if with_all:
        state = scratch / f"{topic}.sqlite3"
        row(f"after: no local state, all {partitions} partitions", pairs,
            run_phase("after", bootstrap, topic, partitions, state, everything, pairs))
        row("after: restart with local state, all partitions", pairs,
            run_phase("after", bootstrap, topic, partitions, state, everything, pairs))
        replica, stored = state, pairs
    size = sum(f.stat().st_size for f in scratch.glob(f"{replica.name}*"))
    print(f"store on disk with {stored:,} pairs: {size / 1e6:.0f} MB ({size / stored:.0f} bytes a pair)",
          flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--phase":
        phase(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kafka", required=True, help="bootstrap servers of a real broker")
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=250_000, help="a second, smaller history")
    parser.add_argument("--partitions", type=int, default=DELIVERY_PARTITIONS)
    parser.add_argument("--no-before", action="store_true", help="skip the old path (slow and large)")
    parser.add_argument("--replica-only", action="store_true",
                        help="only a replica owning a third of the partitions (no all-partitions rows)")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scale-deliverer-") as scratch:
        for pairs in (arguments.small, arguments.pairs):
            measure(arguments.kafka, pairs, arguments.partitions, Path(scratch),
                    with_before=not arguments.no_before, with_all=not arguments.replica_only)
    print(f"(machine: {os.cpu_count()} cores shared with other work; figures are contended)")


if __name__ == "__main__":
    main()
