"""services/runtime/log.py: which records a ranged read keeps (no I/O)."""

from __future__ import annotations

import pytest

from services.runtime.log import kept


@pytest.mark.parametrize(("offset", "key", "wanted", "expected"), [
    (3, b"a", None, True),  # no key asked: every record in range
    (3, None, None, True),
    (3, b"a", b"a", True),
    (3, b"b", b"a", False),  # another message's record is never built
    (3, None, b"a", False),
    (2, b"a", b"a", False),  # before the range: the batch it came in started earlier
    (5, b"a", b"a", False),  # the end is exclusive: a fetch runs past it
])
def test_a_read_keeps_the_records_in_its_range_with_the_key_asked(
    offset: int, key: bytes | None, wanted: bytes | None, expected: bool
) -> None:
    assert kept(offset, key, 3, 5, wanted) is expected
