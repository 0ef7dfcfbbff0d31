"""Throughput of the routing core over the public corpus, beside the stdlib header parser as a baseline.

    .venv/bin/python bench/route.py [--passes K]

Every file under shared/corpus/public/messages is read into memory first, so only `resolve` is timed.
The baseline parses the same bytes with `email.parser.BytesHeaderParser` (headersonly): the stdlib's
own header reading, which popbridge cannot use because it ends lines at a bare CR.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

from services.router.rules import resolve
from services.runtime.settings import load_routing_rules

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus" / "public" / "messages"
RULES = REPO / "tests" / "unit" / "router" / "spec_example.json"


def _corpus() -> list[bytes]:
    return [path.read_bytes() for path in sorted(CORPUS.rglob("*")) if path.is_file()]


def _rate(work: Callable[[bytes], object], messages: list[bytes], passes: int) -> float:
    started = time.perf_counter()
    for _ in range(passes):
        for raw in messages:
            work(raw)
    return len(messages) * passes / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=20)
    passes = parser.parse_args().passes
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the brief measures
    rules = load_routing_rules(RULES)
    messages = _corpus()
    headers = BytesHeaderParser(policy=compat32)
    _rate(lambda raw: resolve(raw, rules), messages, 1)  # warm the caches of both
    _rate(lambda raw: headers.parsebytes(raw, headersonly=True), messages, 1)
    routed = _rate(lambda raw: resolve(raw, rules), messages, passes)
    baseline = _rate(lambda raw: headers.parsebytes(raw, headersonly=True), messages, passes)
    shape = f"({len(messages)} messages x {passes} passes)"
    print(f"route core: {routed:,.0f} msgs/s {shape}")
    print(f"baseline email.parser.BytesHeaderParser(headersonly): {baseline:,.0f} msgs/s {shape}")


if __name__ == "__main__":
    main()
