"""Integration tests share the real parts; each test must also leave no unclosed socket behind."""

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def collect_leaks_here() -> Iterator[None]:
    """Collect garbage when the test ends, so a transport or client it left open warns (and fails) in
    this test, not in whichever later test the collector happens to run in."""
    yield
    gc.collect()
