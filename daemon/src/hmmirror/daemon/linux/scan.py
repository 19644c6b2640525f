"""PAGEMAP_SCAN (Linux 6.7+): ask the kernel which pages of a range are huge.

Debian's headers predate the ioctl, so the constants are defined here
(values from include/uapi/linux/fs.h, checked by behaviour on 6.18).
"""

from __future__ import annotations

import ctypes
import fcntl
import struct

PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg), 96 bytes
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_WRITTEN = 1 << 1
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
_REGION = struct.Struct("3Q")
_NVEC = 512


def regions(pagemap_fd: int, start: int, end: int, category: int) -> list[tuple[int, int]]:
    """Return the [start, end) runs of pages in the range that have every ``category`` bit.

    Returns an empty list if the kernel lacks PAGEMAP_SCAN.
    """
    # A range of n pages has at most n regions: a one-page fault needs a one-entry vector.
    nvec = max(1, min(_NVEC, (end - start) >> 12))
    vec = ctypes.create_string_buffer(_REGION.size * nvec)
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        arg = bytearray(
            struct.pack(
                "12Q", 96, 0, pos, end, 0, ctypes.addressof(vec), nvec, 0, 0, category, 0, category
            )
        )
        try:
            n = fcntl.ioctl(pagemap_fd, PAGEMAP_SCAN, arg)
        except OSError:
            return out
        for i in range(n):
            lo, hi, _ = _REGION.unpack_from(vec, _REGION.size * i)
            out.append((lo, hi))
        if n < nvec:
            break
        # walk_end can be stale on 6.18 when the buffer fills: resume after the last region.
        pos = max(struct.unpack_from("Q", arg, 32)[0], out[-1][1])
    return out


def written(pagemap_fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """Get-and-clear: the [start, end) runs written since the last call, write-protected again.

    The range must lie in VMAs registered with a WP_ASYNC userfaultfd (else EPERM,
    raised). The first call on a range reports all of it and arms it. Works
    around 6.18's stale ``walk_end``: a short vector means the walk is done,
    otherwise resume after the last region returned.
    """
    vec = ctypes.create_string_buffer(_REGION.size * _NVEC)
    out: list[tuple[int, int]] = []
    pos = start
    flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
    while pos < end:
        arg = bytearray(
            struct.pack(
                "12Q", 96, flags, pos, end, 0, ctypes.addressof(vec), _NVEC, 0,
                0, PAGE_IS_WRITTEN, 0, PAGE_IS_WRITTEN,
            )
        )  # fmt: skip
        n = fcntl.ioctl(pagemap_fd, PAGEMAP_SCAN, arg)
        for i in range(n):
            lo, hi, _ = _REGION.unpack_from(vec, _REGION.size * i)
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
        if n < _NVEC:
            break
        pos = max(struct.unpack_from("Q", arg, 32)[0], out[-1][1])
    return out
