"""Drain a 1,000-message Dovecot mailbox into Kafka with popbridge's fetcher, beside a plain poplib loop.

    .venv/bin/python -m bench.fetch [--messages 1000] [--kafka HOST:PORT] [--tls]

Starts its own Dovecot (tests/support/dovecot.py) and, without --kafka, its own broker
(deploy/local/kafka_broker.py). The mailbox mixes sizes (70% 2-10 KB, 25% 50-300 KB, 5% 1-5 MB) with a
fixed seed. Both contenders drain the same mail in the same run: popbridge publishes every message to the
fetched topic and its memory entry to the fetch-state topic before deleting it (acks=all); the poplib
loop only does RETR + DELE per message, with nothing durable in between. Prints messages/s and MB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import poplib
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.fetch_protocol import mailbox
from schemas.topics import FETCH_STATE, FETCHED, TopicSpec, topic_spec
from services.fetcher.fetch_state import open_memory
from services.fetcher.service import Fetcher
from services.runtime.kafka import KafkaLog
from services.runtime.log import Outgoing
from services.runtime.settings import DeploymentSettings, Mailbox
from tests.support.dovecot import TLS_HOSTNAME, DovecotServer

BROKER = Path(__file__).resolve().parents[1] / "deploy" / "local" / "kafka_broker.py"


def poplib_loop(server: DovecotServer, user: str, password: str, *, tls: bool) -> int:
    """RETR + DELE each message, one at a time, then QUIT; returns the bytes retrieved."""
    if tls:
        context = ssl.create_default_context(cafile=str(server.ca_file))
        client: poplib.POP3 = poplib.POP3_SSL(TLS_HOSTNAME, server.pop3s_port, context=context)
    else:
        client = poplib.POP3(server.host, server.pop3_port)
    client.user(user)
    client.pass_(password)
    count, _ = client.stat()
    total = 0
    for number in range(1, count + 1):
        _, _, octets = client.retr(number)
        total += octets
        client.dele(number)
    client.quit()
    return total


async def popbridge_fetcher(
    bootstrap: str, server: DovecotServer, user: str, password: str, *, tls: bool
) -> float:
    """Seconds of one fetcher pass (connect to QUIT), after the topics exist and have leaders."""
    log = KafkaLog(bootstrap)
    settings = DeploymentSettings(kafka_bootstrap=bootstrap, topic_prefix=f"bench-{uuid.uuid4().hex[:6]}-")
    specs = [topic_spec(name) for name in (FETCHED, FETCH_STATE)]
    await log.ensure_topics([TopicSpec(settings.topic(s.name), s.partitions, s.config) for s in specs])
    box = Mailbox(
        id="bench", host=TLS_HOSTNAME if tls else server.host, tls="implicit" if tls else "none",
        port=server.pop3s_port if tls else server.pop3_port, ca_file=str(server.ca_file), username=user,
        password_env="PW",
        recipients=("a@example.com",),
    )  # fmt: skip
    for _ in range(30):  # fresh topics: wait until every partition has a leader
        if len(await log.end_offsets(settings.topic(FETCHED))) == specs[0].partitions:
            break
        await asyncio.sleep(0.5)
    # The memory is opened (and caught up) before the warm-up records, which are not fetch state.
    async with open_memory(log, settings.topic(FETCH_STATE), None) as memory, log.producer() as producer:
        await producer.send_all(
            [Outgoing(settings.topic(t), b"warm-up", b"k") for t in (FETCHED, FETCH_STATE)]
        )
        fetcher = Fetcher(
            settings=settings, producer=producer, memory=memory, environ={"PW": password}
        )
        started = time.perf_counter()
        result = await fetcher.poll(box)
        elapsed = time.perf_counter() - started
    if result.error:
        raise SystemExit(f"fetcher failed: {result.error}")
    print(f"  (fetcher pass: {result.published} published in {result.sessions} sessions, {elapsed:.2f} s)")
    return elapsed


def start_broker(directory: Path) -> str:
    done = subprocess.run([sys.executable, str(BROKER), "start", "--dir", str(directory)],
                          capture_output=True, text=True, check=True, timeout=600)  # fmt: skip
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--kafka", help="bootstrap servers of a running broker (default: start one)")
    parser.add_argument("--tls", action="store_true", help="POP3S instead of clear-text POP3")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="popbridge-bench-"))
    root.chmod(0o755)
    broker_dir = root / "kafka"
    messages = mailbox(args.messages)
    megabytes = sum(len(m) for m in messages) / 1e6
    try:
        bootstrap = args.kafka or start_broker(broker_dir)
        (root / "dovecot").mkdir(mode=0o755)
        with DovecotServer(root / "dovecot") as server:
            results: dict[str, float] = {}
            for name in ("poplib RETR+DELE (no Kafka)", "popbridge fetcher -> Kafka"):
                user = f"bench{len(results)}"
                server.add_user(user, "bench-password")
                server.deliver_many(user, messages)
                if name.startswith("poplib"):
                    started = time.perf_counter()
                    poplib_loop(server, user, "bench-password", tls=args.tls)
                    results[name] = time.perf_counter() - started
                else:
                    results[name] = asyncio.run(
                        popbridge_fetcher(bootstrap, server, user, "bench-password", tls=args.tls)
                    )
                assert server.message_count(user) == 0, f"{name} left mail behind"
        print(f"{args.messages} messages, {megabytes:.1f} MB, {'POP3S' if args.tls else 'POP3'}:")
        for name, seconds in results.items():
            print(
                f"  {name:32} {seconds:6.2f} s  {args.messages / seconds:8.1f} msg/s"
                f"  {megabytes / seconds:7.1f} MB/s"
            )
    finally:
        if not args.kafka:
            subprocess.run(
                [sys.executable, str(BROKER), "stop", "--dir", str(broker_dir)], check=False, timeout=120
            )
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
