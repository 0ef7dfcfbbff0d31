"""`python -m tests.chaos --seed N --messages M --duration S [--replicas 2] [--no-faults] [--cold-start]
[--short] [--settle S] [--keep DIR] [--json out.json]`: one chaos run; exit 1 when it found a problem."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from types import FrameType

from tests.chaos.harness import Options, run
from tests.chaos.report import failures, table


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True, help="chooses the mail and the faults")
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the fault phase")
    parser.add_argument("--replicas", type=int, default=2, help="processes per stage")
    parser.add_argument("--no-faults", action="store_true", help="run the same load without any fault")
    parser.add_argument("--cold-start", action="store_true", help="start every replica at the same moment")
    parser.add_argument("--short", action="store_true", help="the short fault profile of the default tests")
    parser.add_argument("--settle", type=float, default=180.0, help="at most this long for the last mail")
    parser.add_argument("--keep", type=Path, help="copy the run's logs and SMTP journal here")
    parser.add_argument("--json", type=Path, help="write the full report here")
    return parser.parse_args(argv)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the harness's clean-up: every process is killed


def main(argv: list[str] | None = None) -> int:
    arguments = _parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    options = Options(
        seed=arguments.seed, messages=arguments.messages, duration=arguments.duration,
        replicas=arguments.replicas, faults=not arguments.no_faults, short=arguments.short,
        cold_start=arguments.cold_start, settle=arguments.settle, keep=arguments.keep,
    )  # fmt: skip
    report = run(options)
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(table(report))
    problems = failures(report)
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
