"""Keep the memory hmmd frees for its next large array, rather than give it back at once.

A FAULT of 1 GiB works on three arrays of 2 MiB (the raw pagemap, the entries,
the shadow's copy), and a DMA read on buffers of up to 4 MiB. glibc serves such
sizes from the heap once it has freed one (its mmap threshold follows the
largest chunk freed), but gives the top of the heap back to the kernel as soon
as 4 MiB of it are free: a mirror closed, and its 4 MiB of shadow go back. The
next fault then takes each page afresh, a minor fault per 4 KiB (1,500 for a
1 GiB fault, about 2 ms on a virtual machine: as long as the pagemap read it
answers). Fixing the thresholds keeps up to :data:`TRIM_THRESHOLD` of free heap
for reuse; it is a bound, not a leak: what is kept is what hmmd used at its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Final

log = logging.getLogger(__name__)

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3
#: Free heap kept at its top before glibc trims it.
TRIM_THRESHOLD: Final = 64 << 20
#: Allocations below this come from the heap (glibc's largest allowed value on 64-bit):
#: fixing it also stops glibc moving the trim threshold by itself.
MMAP_THRESHOLD: Final = 32 << 20


def keep_freed_memory() -> bool:
    """Fix glibc's trim and mmap thresholds for this process; False where there is no glibc
    ``mallopt`` (another C library: its defaults then stand)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        log.info("no mallopt in the C library: freed memory is returned as the allocator likes")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
