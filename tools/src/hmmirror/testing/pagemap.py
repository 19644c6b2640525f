"""A process's raw ``/proc/PID/pagemap`` entries, read by the test itself, never through hmmd.

What a mirror may hold is judged against what the kernel maps now, so the tests read
the target's pagemap themselves. :func:`pagemap` returns the kernel's 64-bit words for
a run of pages as a numpy array; the ``PM_*`` constants pick their fields (Linux's
Documentation/admin-guide/mm/pagemap.rst). The PFN field reads 0 without
CAP_SYS_ADMIN.
"""

from __future__ import annotations

import os
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["PAGE_SIZE", "PM_EXCLUSIVE", "PM_PFN", "PM_PRESENT", "pagemap"]

PAGE_SIZE: Final = 4096
#: Bit 63: the page is present in RAM.
PM_PRESENT: Final = 1 << 63
#: Bit 56: the page is mapped exclusively (by this process alone).
PM_EXCLUSIVE: Final = 1 << 56
#: Bits 0-54: the page frame number, when present.
PM_PFN: Final = (1 << 55) - 1


def pagemap(pid: int, addr: int, npages: int) -> npt.NDArray[np.uint64]:
    """The pagemap entries of ``npages`` pages of ``pid`` from ``addr``, read now."""
    raw = np.zeros(npages, dtype=np.uint64)
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        os.preadv(fd, [raw.data.cast("B")], (addr // PAGE_SIZE) * 8)
    finally:
        os.close(fd)
    return raw
