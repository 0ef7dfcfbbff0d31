"""Retrieve N messages from a throwaway Dovecot: popbridge's client pipelined, one at a time, and poplib.

    .venv/bin/python -m bench.fetch_protocol --messages 1000 [--tls] [--runs 3]

The mailbox mixes sizes like the measurements in shared/notes/performance.md (70% 2-10 KB, 25%
50-300 KB, 5% 1-5 MB), with a fixed seed; `--small` makes every message 2-10 KB. Nothing is
deleted, so every run reads the same mail. Prints the median of the runs, messages per second and
MB per second, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import poplib
import random
import shutil
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from services.fetcher.pop3 import Pop3Client, tls_context
from tests.support.dovecot import TLS_HOSTNAME, DovecotServer

USER, PASSWORD = "bench", "bench-password"


def mailbox(count: int, *, small: bool = False, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [_message(n, _size(rng, small=small), rng) for n in range(count)]


def _size(rng: random.Random, *, small: bool) -> int:
    roll = 0.0 if small else rng.random()
    if roll < 0.70:
        return rng.randint(2_000, 10_000)
    if roll < 0.95:
        return rng.randint(50_000, 300_000)
    return rng.randint(1_000_000, 5_000_000)


def _message(number: int, size: int, rng: random.Random) -> bytes:
    header = f"From: a@example.test\r\nTo: b@example.test\r\nSubject: bench {number}\r\n\r\n".encode()
    body = base64.encodebytes(rng.randbytes(size * 3 // 4)).replace(b"\n", b"\r\n")
    return header + body


async def popbridge_client(server: DovecotServer, *, tls: bool, pipelining: bool) -> tuple[int, int]:
    port = server.pop3s_port if tls else server.pop3_port
    context = tls_context(str(server.ca_file))
    client = await Pop3Client.connect(
        server.host, port, tls="implicit" if tls else "none", ssl_context=context,
        server_hostname=TLS_HOSTNAME, pipelining=pipelining,
    )  # fmt: skip
    async with client:
        await client.login(USER, PASSWORD)
        count, _ = await client.stat()
        total = 0
        async for _, raw in client.retr_many(range(1, count + 1)):
            total += len(raw)
        await client.quit()
    return count, total


def stdlib_poplib(server: DovecotServer, *, tls: bool) -> tuple[int, int]:
    if tls:
        context = ssl.create_default_context(cafile=str(server.ca_file))
        client: poplib.POP3 = poplib.POP3_SSL(TLS_HOSTNAME, server.pop3s_port, context=context)
    else:
        client = poplib.POP3(server.host, server.pop3_port)
    client.user(USER)
    client.pass_(PASSWORD)
    count, _ = client.stat()
    total = 0
    for number in range(1, count + 1):
        _, lines, _ = client.retr(number)
        total += sum(len(line) + 2 for line in lines)
    client.quit()
    return count, total


def timed(run: Callable[[], tuple[int, int]], runs: int) -> tuple[float, float]:
    """Median messages/s and MB/s over `runs` runs."""
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        count, total = run()
        elapsed = time.perf_counter() - started
        rates.append((count / elapsed, total / elapsed / 1e6))
    return statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tls", action="store_true", help="POP3S (implicit TLS) instead of plain POP3")
    parser.add_argument("--small", action="store_true", help="only 2-10 KB messages (round trips count)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="popbridge-bench-"))
    root.chmod(0o755)
    try:
        with DovecotServer(root) as server:
            server.add_user(USER, PASSWORD)
            messages = mailbox(args.messages, small=args.small)
            server.deliver_many(USER, messages)
            print(f"{len(messages)} messages, {sum(map(len, messages)) / 1e6:.0f} MB, tls={args.tls}")
            report(server, tls=args.tls, runs=args.runs)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(server: DovecotServer, *, tls: bool, runs: int) -> None:
    paths: dict[str, Callable[[], tuple[int, int]]] = {
        "popbridge, pipelined (16 in flight)": lambda: asyncio.run(
            popbridge_client(server, tls=tls, pipelining=True)
        ),
        "popbridge, one command at a time": lambda: asyncio.run(
            popbridge_client(server, tls=tls, pipelining=False)
        ),
        "stdlib poplib": lambda: stdlib_poplib(server, tls=tls),
    }
    print(f"{'path':40} {'msg/s':>9} {'MB/s':>8}")
    for name, run in paths.items():
        messages_per_second, megabytes_per_second = timed(run, runs)
        print(f"{name:40} {messages_per_second:9.0f} {megabytes_per_second:8.0f}")


if __name__ == "__main__":
    main()
