"""Benchmark the deliverer's SMTP sending core against a plain smtplib loop, into one aiosmtpd sink.

    .venv/bin/python bench/deliver.py [--messages 1000] [--connections 2] [--kafka HOST:PORT]

The same deterministic mix of messages (70% 2-10 KB, 25% 50-300 KB, 5% 1-5 MB; seed 42) goes, in the
same run, into an aiosmtpd sink running in its own process (it counts bytes and stores nothing):
1. `smtplib`: one connection, `sendmail` per message, one after another (the naive bridge's way);
2. popbridge's SmtpTransport: Received field added, EHLO-driven envelope, PIPELINING, sessions reused
   with RSET, `--connections` in parallel;
3. with `--kafka`, the whole stage: the messages as routed events on fresh topics, `Deliverer.run(
   until_idle=True)` reading them, delivering and publishing DeliveryAttempted + ledger records.
Each line reports messages/s and MB/s (message bytes, 10^6).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import random
import smtplib
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from multiprocessing.synchronize import Event as EventType
from typing import Any

from aiosmtpd.controller import Controller

from schemas.codec import encode
from schemas.events import Recipient, RecipientsResolved
from schemas.topics import ROUTED, TOPICS, TopicSpec
from services.deliverer.service import Deliverer
from services.deliverer.smtp import SmtpTransport
from services.runtime.kafka import KafkaLog
from services.runtime.log import Outgoing
from services.runtime.settings import DeploymentSettings, SmtpTarget

HOST = "127.0.0.1"
SENDER = "bob@remote.example"


def message_mix(count: int, seed: int = 42) -> list[bytes]:
    """`count` messages of the mixed sizes, the same for the same seed."""
    rng = random.Random(seed)
    block = base64.encodebytes(rng.randbytes(4 * 1024 * 1024))  # 76-column lines, LF endings
    block = block.replace(b"\n", b"\r\n")
    messages = []
    for index in range(count):
        draw = rng.random()
        low, high = (
            (2_000, 10_000) if draw < 0.70 else (50_000, 300_000) if draw < 0.95 else (1_000_000, 5_000_000)
        )
        size = rng.randint(low, high)
        header = (
            f"From: Bob <{SENDER}>\r\nTo: alice@example.com\r\nSubject: message {index}\r\n"
            f"Message-ID: <{index}.bench@remote.example>\r\n\r\n"
        ).encode()
        start = rng.randrange(0, len(block) - size)
        body = block[start : start + size]
        body = body[body.find(b"\r\n") + 2 :]
        messages.append(header + body + b"\r\n")
    return messages


class _Counter:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802  # aiosmtpd's name
        return "250 2.0.0 OK"


def _sink(port: int, ready: EventType, done: EventType) -> None:
    controller = Controller(
        _Counter(),
        hostname=HOST,
        port=port,
        server_hostname="sink.bench",
        decode_data=False,
        data_size_limit=64 * 1024 * 1024,
    )
    controller.start()
    ready.set()
    done.wait()
    controller.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _report(name: str, messages: list[bytes], seconds: float) -> None:
    megabytes = sum(len(m) for m in messages) / 1e6
    print(
        f"{name:44} {len(messages) / seconds:8.1f} msg/s {megabytes / seconds:8.1f} MB/s  ({seconds:.2f} s)"
    )


def bench_smtplib(port: int, messages: list[bytes]) -> float:
    started = time.perf_counter()
    with smtplib.SMTP(HOST, port) as client:
        for message in messages:
            client.sendmail(SENDER, ["alice@example.com"], message)
    return time.perf_counter() - started


async def bench_transport(port: int, messages: list[bytes], connections: int) -> float:
    target = SmtpTarget(host=HOST, port=port, tls="none", connections=connections, helo_name="bench")
    started = time.perf_counter()
    async with SmtpTransport(target) as transport:
        results = await asyncio.gather(
            *(transport.deliver(SENDER, ["alice@example.com"], m) for m in messages)
        )
    elapsed = time.perf_counter() - started
    failed = [v for r in results for v in r.values() if v.outcome != "delivered"]
    if failed:
        raise SystemExit(f"{len(failed)} copies not delivered: {failed[0]}")
    return elapsed


async def bench_stage(bootstrap: str, port: int, messages: list[bytes], connections: int) -> float:
    prefix = f"bench-{uuid.uuid4().hex[:8]}-"
    log = KafkaLog(bootstrap)
    await log.ensure_topics([TopicSpec(prefix + s.name, s.partitions, s.config) for s in TOPICS])
    settings = DeploymentSettings(kafka_bootstrap=bootstrap, topic_prefix=prefix, group_prefix=prefix + "g")
    async with log.producer() as producer:
        for index in range(0, len(messages), 50):
            await producer.send_all(
                [_routed(settings, i, m) for i, m in enumerate(messages[index : index + 50], index)]
            )
    target = SmtpTarget(host=HOST, port=port, tls="none", connections=connections, helo_name="bench")
    started = time.perf_counter()
    async with SmtpTransport(target) as transport:
        counts = await Deliverer(log, settings, transport).run(until_idle=True)
    if counts.delivered != len(messages):
        raise SystemExit(f"only {counts.delivered} of {len(messages)} delivered")
    return time.perf_counter() - started


def _routed(settings: DeploymentSettings, index: int, raw: bytes) -> Outgoing:
    fetch_id = f"{index:032x}"
    event = RecipientsResolved(
        fetch_id=fetch_id,
        mailbox_id="bench",
        pop3_host="pop.isp.example",
        message_id=None,
        envelope_sender=SENDER,
        recipients=(Recipient(address="alice@example.com", reason="bench"),),
        reason="bench",
        rules_version="bench",
        routed_at=datetime.now(UTC),
        raw=raw,
    )
    return Outgoing(settings.topic(ROUTED), encode(event), fetch_id.encode())


def _with_sink(run: Callable[[int], None]) -> None:
    port = _free_port()
    ready, done = multiprocessing.Event(), multiprocessing.Event()
    process = multiprocessing.Process(target=_sink, args=(port, ready, done), daemon=True)
    process.start()
    try:
        if not ready.wait(10):
            raise SystemExit("the sink did not start")
        run(port)
    finally:
        done.set()
        process.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--kafka", help="bootstrap servers; also run the whole stage through Kafka")
    args = parser.parse_args()
    messages = message_mix(args.messages)
    print(
        f"{len(messages)} messages, {sum(map(len, messages)) / 1e6:.1f} MB, sink: aiosmtpd in its own process"
    )

    def run(port: int) -> None:
        _report("smtplib, 1 connection", messages, bench_smtplib(port, messages))
        for connections in sorted({1, args.connections}):
            seconds = asyncio.run(bench_transport(port, messages, connections))
            _report(f"popbridge SmtpTransport, {connections} connection(s)", messages, seconds)
        if args.kafka:
            seconds = asyncio.run(bench_stage(args.kafka, port, messages, args.connections))
            _report(f"popbridge deliverer stage via Kafka, {args.connections} conn.", messages, seconds)

    _with_sink(run)


if __name__ == "__main__":
    main()
