"""Every message of the public corpus routes to a valid decision, quickly (shared/corpus/public/README.md).

The corpus carries no routing expectations: most files have no Received or envelope fields. What it
proves is that broken, huge and 8-bit messages never crash or stall the router.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from services.router.rules import resolve
from services.runtime.settings import RoutingRules
from tests.support.parts import CORPUS, missing_part
from tests.unit.router.messages import assert_valid_decision

FILES = sorted(path for path in CORPUS.rglob("*") if path.is_file()) if CORPUS.is_dir() else []


def test_the_corpus_is_beside_the_checkout() -> None:
    if not FILES:
        missing_part(f"the public corpus is not beside this checkout ({CORPUS})")
    manifest = CORPUS.parent / "MANIFEST"
    listed = [line for line in manifest.read_text().splitlines() if line and not line.startswith("#")]
    assert len(FILES) == len(listed)


@pytest.mark.parametrize("path", FILES, ids=[str(path.relative_to(CORPUS)) for path in FILES])
def test_every_corpus_message_routes_to_a_valid_decision(rules: RoutingRules, path: Path) -> None:
    raw = path.read_bytes()
    started = time.perf_counter()
    decision = resolve(raw, rules)
    # A guard against runaway parsing (backtracking, quadratic header folding), not a speed target: the
    # slowest file (a 130 KB To field) takes a few milliseconds, so 5 s holds on a loaded machine.
    assert time.perf_counter() - started < 5.0
    assert_valid_decision(decision, raw, rules)
