"""The pinned mmap threshold (services/runtime/memory.py), each case in a fresh interpreter: the threshold
is process-wide and the case needs a heap that has not met a large block yet."""

from __future__ import annotations

import subprocess
import sys

import pytest

# After a 5 MB block came and went, is a 2 MB buffer mapped on its own (glibc's mallinfo2: hblks)?
PROBE = """
import ctypes, sys
from services.runtime.memory import pin_mmap_threshold
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "pinned":
    assert pin_mmap_threshold()
big = bytes(5 * 1024 * 1024)
del big
mapped = libc.mallinfo2().hblks
message = bytes(2 * 1024 * 1024)
print(libc.mallinfo2().hblks - mapped)
"""


def mapped_on_its_own(mode: str) -> bool:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and mallinfo2")
def test_after_a_5_mb_mail_a_2_mb_one_is_still_mapped_on_its_own_and_so_returned_when_freed() -> None:
    assert not mapped_on_its_own("default")  # glibc's moving threshold: the heap, resident after free
    assert mapped_on_its_own("pinned")
