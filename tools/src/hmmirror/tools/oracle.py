"""The translation oracle: check agents' VALID entries against the live pagemap, read independently.

At a quiescent point (target stopped, watcher caught up, no invalidation in
flight) every VALID entry a mirror holds must name the page the target maps
right now, and a WRITE entry must sit in a writable VMA, on a page the target
maps exclusively: a private VMA's page with pagemap bit 56 (``PM_MMAP_EXCLUSIVE``)
and not a file's page cache (bit 61), as ``hmm_range_fault`` hands out WRITE only
on a page the write fault broke copy-on-write for. The zero page is never
exclusive; a shared VMA's page may be WRITE without it. Anything else is a
coherence violation. The oracle reads /proc itself, never through hmmd.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from hmmirror.client.mirror import Mirror
from hmmirror.proto.entries import HMM_PFN_PFN_MASK, HMM_PFN_VALID, HMM_PFN_WRITE, PAGE_SHIFT

_PRESENT = np.uint64(1 << 63)
_PFN = np.uint64((1 << 55) - 1)
_EXCLUSIVE = 1 << 56
_FILE = 1 << 61


@dataclass(frozen=True)
class Violation:
    """One stale translation: which mirror, which page, what it held, what is live."""

    mirror: int
    addr: int
    entry: int
    live: int
    kind: str


def writable_pages(pid: int, start: int, npages: int) -> tuple[np.ndarray, np.ndarray]:
    """Per page from ``start``: whether a writable VMA of ``pid`` covers it, and whether
    that VMA is private (the 4th perms character of /proc/PID/maps: 'p', not 's')."""
    out = np.zeros(npages, dtype=np.bool_)
    private = np.zeros(npages, dtype=np.bool_)
    end = start + (npages << PAGE_SHIFT)
    with open(f"/proc/{pid}/maps", "rb") as f:
        for line in f:
            lo_hi, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in lo_hi.split(b"-"))
            if hi <= start or lo >= end or perms[1:2] != b"w":
                continue
            a, b = (max(lo, start) - start) >> PAGE_SHIFT, (min(hi, end) - start) >> PAGE_SHIFT
            out[a:b] = True
            private[a:b] = perms[3:4] == b"p"
    return out, private


def check(mirror: Mirror) -> list[Violation]:
    """Compare ``mirror``'s VALID entries with the live page table of its target."""
    physical = mirror.session.physical_frames
    return check_table(mirror.id, mirror.pid, mirror.start, mirror.table.copy(), physical)


def check_table(
    mirror: int, pid: int, start: int, table: np.ndarray, physical: bool = True
) -> list[Violation]:
    """Compare a device page table over [start, ...) of ``pid`` with the live pagemap.

    ``table`` may come from another process (an agent's MTT, sent as bytes):
    the check needs only the entries, never the agent's objects. Entries that
    carry frame tokens (``physical`` false: the session was given no physical
    frames) cannot be compared with PFNs: then only presence and WRITE are
    checked, and a replaced page goes unseen. The checker's agents connect as
    root over ipc, which gets physical frames.
    """
    held = np.flatnonzero(table & np.uint64(HMM_PFN_VALID))
    if len(held) == 0:
        return []
    npages = len(table)
    live = np.zeros(npages, dtype=np.uint64)
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        os.preadv(fd, [live.data.cast("B")], (start >> PAGE_SHIFT) * 8)
    finally:
        os.close(fd)
    writable, private = writable_pages(pid, start, npages)
    found = []
    for i in held:
        entry, now = int(table[i]), int(live[i])
        addr = start + (int(i) << PAGE_SHIFT)
        if not now & int(_PRESENT):
            found.append(Violation(mirror, addr, entry, now, "entry for a page that is gone"))
        elif physical and (now & int(_PFN)) != (entry & HMM_PFN_PFN_MASK):
            found.append(Violation(mirror, addr, entry, now, "entry names a replaced page"))
        elif entry & HMM_PFN_WRITE and not writable[i]:
            found.append(Violation(mirror, addr, entry, now, "WRITE entry in a read-only VMA"))
        elif entry & HMM_PFN_WRITE and private[i] and (now & (_EXCLUSIVE | _FILE)) != _EXCLUSIVE:
            found.append(
                Violation(mirror, addr, entry, now, "WRITE entry on a page shared copy-on-write")
            )
    return found
