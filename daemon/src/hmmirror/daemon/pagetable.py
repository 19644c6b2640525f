"""From raw pagemap entries and VMAs to ``hmm_pfn`` entries, and from two views to events.

This is the daemon's ``hmm_range_fault`` walk and its change detector. Both are
vectorised over numpy arrays; no per-page Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from hmmirror.daemon.linux.procfs import (
    PAGE_SHIFT,
    PM_EXCLUSIVE,
    PM_PFN_MASK,
    PM_PRESENT,
    PM_UFFD_WP,
    Raw,
    Vmas,
)
from hmmirror.proto.entries import (
    HMM_PFN_ERROR,
    HMM_PFN_ORDER_SHIFT,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    PMD_ORDER,
    Entries,
)
from hmmirror.proto.messages import Event

_VALID = np.uint64(HMM_PFN_VALID)
_WRITE = np.uint64(HMM_PFN_WRITE)
_ERROR = np.uint64(HMM_PFN_ERROR)
_PMD = np.uint64(PMD_ORDER << HMM_PFN_ORDER_SHIFT)


def derive(
    raw: Raw,
    perms: Perms,
    zero_pfn: int,
    write_fault: bool,
    huge: npt.NDArray[np.bool_] | None = None,
) -> Entries:
    """Turn raw pagemap entries into ``hmm_pfn`` entries.

    Pages outside a readable VMA get ERROR. Present pages get VALID and their
    PFN. WRITE follows ``pte_write`` as closely as user space can see it: a
    writable shared VMA, or a writable private VMA whose page is exclusively
    mapped, not the zero page and not uffd-write-protected. For a write fault it
    follows the VMA alone, because the device's write goes through
    process_vm_writev, which breaks COW itself (and the PFN change that causes is
    then invalidated).
    """
    readable, writable = perms.readable, perms.writable
    all_readable = bool(readable.all())
    valid = raw >= PM_PRESENT  # bit 63 is the top bit: one compare finds present pages
    if not all_readable:
        valid &= readable
    out = raw & PM_PFN_MASK
    if write_fault:
        can_write = valid if writable.all() else valid & writable
    else:
        # Exclusive and not uffd-wp, in one masked compare; then not the zero page.
        private_ok = (raw & (PM_EXCLUSIVE | PM_UFFD_WP)) == PM_EXCLUSIVE
        if zero_pfn:
            private_ok &= out != np.uint64(zero_pfn)
        if perms.shared.any():
            private_ok |= perms.shared
        can_write = private_ok & valid
        if not writable.all():
            can_write &= writable
    np.bitwise_or(out, _VALID, out=out, where=valid)
    np.bitwise_or(out, _WRITE, out=out, where=can_write)
    if huge is not None and huge.any():
        np.bitwise_or(out, _PMD, out=out, where=valid & huge)
    if not all_readable:
        out[~readable] = _ERROR
    return out


def classify(
    handed: Entries, old_raw: Raw, new_raw: Raw, perms: Perms, zero_pfn: int
) -> npt.NDArray[np.int16]:
    """Return, per page, the ``Event`` that makes a handed-out entry stale, or -1.

    Only pages whose ``handed`` entry is VALID are judged: a device holds no
    translation for the others. In order of precedence: the page left every
    VMA (UNMAP); the VMA lost read, or write under a WRITE entry
    (PROTECTION_VMA); the page is gone (CLEAR); its PFN changed (MIGRATE, or
    CLEAR when the zero page was replaced); it stopped being exclusive under a
    WRITE entry, as fork's COW write-protect does (PROTECTION_PAGE).
    """
    covered, readable, writable = perms.covered, perms.readable, perms.writable
    out = np.full(handed.shape, -1, dtype=np.int16)
    valid = (handed & _VALID) != 0
    if not valid.any():
        return out
    had_write = (handed & _WRITE) != 0
    new_present = (new_raw & PM_PRESENT) != 0
    old_pfn = old_raw & PM_PFN_MASK
    new_pfn = new_raw & PM_PFN_MASK
    pfn_changed = new_present & (old_pfn != new_pfn)
    lost_excl = (
        had_write & ((old_raw & PM_EXCLUSIVE) != 0) & ((new_raw & PM_EXCLUSIVE) == 0) & ~pfn_changed
    )
    # Assign in reverse precedence so the strongest reason wins.
    out[valid & lost_excl] = Event.PROTECTION_PAGE
    migrate = valid & pfn_changed
    out[migrate] = Event.MIGRATE
    if zero_pfn:
        out[migrate & (old_pfn == np.uint64(zero_pfn))] = Event.CLEAR
    out[valid & ~new_present] = Event.CLEAR
    out[valid & covered & (~readable | (had_write & ~writable))] = Event.PROTECTION_VMA
    out[valid & ~covered] = Event.UNMAP
    return out


def runs(events: npt.NDArray[np.int16], start: int) -> list[tuple[int, int, Event]]:
    """Group per-page events into maximal [start, end) runs of one event."""
    idx = np.flatnonzero(events >= 0)
    if len(idx) == 0:
        return []
    ev = events[idx]
    breaks = np.flatnonzero((np.diff(idx) != 1) | (np.diff(ev) != 0)) + 1
    out = []
    for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(idx)], strict=True):
        first, last = int(idx[lo]), int(idx[hi - 1])
        out.append(
            (start + (first << PAGE_SHIFT), start + ((last + 1) << PAGE_SHIFT), Event(int(ev[lo])))
        )
    return out


@dataclass(frozen=True)
class Perms:
    """Per-page VMA facts for a range: covered by a VMA, readable, writable, shared."""

    covered: npt.NDArray[np.bool_]
    readable: npt.NDArray[np.bool_]
    writable: npt.NDArray[np.bool_]
    shared: npt.NDArray[np.bool_]


def vma_perms(vmas: Vmas, start: int, npages: int) -> Perms:
    """Per-page VMA permissions of the range. Special (IO/PFNMAP-like) VMAs read as unreadable.

    Filled per VMA, not looked up per page: a range is covered by a handful of
    VMAs, so this costs a few slice assignments even for a 1 GiB range.
    """
    covered, readable, writable, shared = np.zeros((4, npages), dtype=np.bool_)  # one allocation
    end = start + (npages << PAGE_SHIFT)
    first = max(int(np.searchsorted(vmas.ends, np.uint64(start), side="right")), 0)
    last = int(np.searchsorted(vmas.starts, np.uint64(end), side="left"))
    for i in range(first, last):
        lo = max(int(vmas.starts[i]), start)
        hi = min(int(vmas.ends[i]), end)
        if lo >= hi:
            continue
        a, b = (lo - start) >> PAGE_SHIFT, (hi - start) >> PAGE_SHIFT
        covered[a:b] = True
        can_read = bool(vmas.readable[i]) and not bool(vmas.special[i])
        readable[a:b] = can_read
        writable[a:b] = can_read and bool(vmas.writable[i])
        shared[a:b] = bool(vmas.shared[i])
    return Perms(covered, readable, writable, shared)
