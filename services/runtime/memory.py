"""The process's heap: a message buffer of 1 MiB or more is mapped on its own and unmapped when freed.

glibc serves an allocation above its mmap threshold with a mapping of its own, returned to the system on
free. The threshold starts at 128 KiB but moves: each freed mapping raises it to that block's size (up to
32 MiB), so after the first 5 MB mail every later message buffer up to 5 MB comes from the heap, whose
freed holes stay resident between the objects that outlive them: that is what a process's peak RSS grew
with. `mallopt(M_MMAP_THRESHOLD)` pins the threshold and turns the moving off. At 1 MiB most mail (2-300 KB)
stays on the heap, reused without page faults; at 128 KiB every buffer above it was mapped and unmapped,
which cost up to half again the CPU in bench/e2e.py. An operator's own MALLOC_MMAP_THRESHOLD_ is left alone
(services.cli does not call this then).
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1024 * 1024


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """True when the C library took it; False where there is no glibc mallopt (macOS; musl ignores it)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
