"""From raw pagemap entries and VMAs to ``hmm_pfn`` entries, and from two views to events.

This is the daemon's ``hmm_range_fault`` walk and its change detector. Both are
vectorised over numpy arrays; no per-page Python objects.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from hmmirror.daemon.linux.procfs import (
    PAGE_SHIFT,
    PM_EXCLUSIVE,
    PM_FILE,
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


#: Entries per pass of the walk: a piece of raw input, its output and the scratch stay in L2
#: (3 x 256 KiB); a whole 1 GiB range in one pass spills and runs four times slower.
PIECE = 32768

_PFN_VALID = np.uint64(int(PM_PFN_MASK) | HMM_PFN_VALID)  # PM_PRESENT is bit 63, as VALID is
_NOTHING = np.uint64(0)
_EXCL_TEST = np.uint64(int(PM_PRESENT | PM_EXCLUSIVE | PM_FILE | PM_UFFD_WP))
_EXCL_TEST_WRITE = np.uint64(int(PM_PRESENT | PM_EXCLUSIVE | PM_FILE))  # a write fault's
_EXCL_WANT = np.uint64(int(PM_PRESENT | PM_EXCLUSIVE))
_NOT_WRITE = ~_WRITE
_ONE = np.uint64(1)


class Stretch(NamedTuple):
    """Pages [a, b) of a walked range under one VMA, or under none (then not readable).

    ``readable`` is false for a special mapping; ``writable`` implies ``readable``.
    """

    a: int
    b: int
    readable: bool
    writable: bool
    shared: bool


def vma_stretches(vmas: Vmas, start: int, npages: int) -> list[Stretch]:
    """The range's pages [0, npages) as consecutive stretches of one VMA each (or of a gap).

    What ``vma_perms`` says per page, said once per VMA: a range is covered by a
    handful of VMAs, and the walk then decides per stretch, not per page.
    """
    end = start + (npages << PAGE_SHIFT)
    first = max(int(np.searchsorted(vmas.ends, np.uint64(start), side="right")), 0)
    last = int(np.searchsorted(vmas.starts, np.uint64(end), side="left"))
    out: list[Stretch] = []
    at = 0
    for i in range(first, last):
        lo = max(int(vmas.starts[i]), start)
        hi = min(int(vmas.ends[i]), end)
        if lo >= hi:
            continue
        a, b = (lo - start) >> PAGE_SHIFT, (hi - start) >> PAGE_SHIFT
        if a > at:
            out.append(Stretch(at, a, False, False, False))
        can_read = bool(vmas.readable[i]) and not bool(vmas.special[i])
        out.append(
            Stretch(a, b, can_read, can_read and bool(vmas.writable[i]), bool(vmas.shared[i]))
        )
        at = b
    if at < npages:
        out.append(Stretch(at, npages, False, False, False))
    return out


def stretches_of(perms: Perms) -> list[Stretch]:
    """The per-page ``Perms`` as stretches of pages alike (``derive`` takes either)."""
    n = len(perms.readable)
    if n == 0:
        return []
    code = perms.readable.astype(np.uint8)
    code |= perms.writable.astype(np.uint8) << np.uint8(1)
    code |= perms.shared.astype(np.uint8) << np.uint8(2)
    cuts = [0, *(int(i) + 1 for i in np.flatnonzero(code[1:] != code[:-1])), n]
    out = []
    for a, b in itertools.pairwise(cuts):
        c = int(code[a])
        readable = bool(c & 1)
        out.append(Stretch(a, b, readable, readable and bool(c & 2), bool(c & 4)))
    return out


def first_lacking(stretches: list[Stretch], write: bool) -> int | None:
    """The first page that is not readable (``write``: not writable), or None."""
    for s in stretches:
        if not (s.writable if write else s.readable):
            return s.a
    return None


def derive_into(
    out: Entries,
    raw: Raw,
    stretches: list[Stretch],
    zero_pfn: int,
    write_fault: bool,
    lo: int = 0,
    hi: int | None = None,
    may_write: bool = True,
) -> None:
    """Turn raw pagemap entries [lo, hi) into ``hmm_pfn`` entries in ``out`` [lo, hi).

    Pages outside a readable VMA get ERROR. Present pages get VALID and their
    PFN. WRITE follows ``pte_write`` as closely as user space can see it: a
    writable shared VMA, or a writable private VMA whose page is exclusively
    mapped (pagemap bit 56), anonymous (not a file's page cache, bit 61), not the
    zero page and not uffd-write-protected. A write fault ignores only the last:
    a page the target write-protected for its own userfaultfd is still its own.
    A page shared copy-on-write never gets WRITE, fault or not: the write fault
    breaks COW first (``fault.service``, as ``hmm_range_fault`` does), and a
    present page left without WRITE tells it where.

    With ``may_write`` false no entry gets WRITE (a mirror without WRITE access).

    Works a piece at a time with no temporaries the size of the range, so that
    the pagemap reader can hand each piece over as it lands (``ProcessView.pagemap_into``);
    pieces of one range may be done on several threads at once.
    """
    hi = len(raw) if hi is None else hi
    scratch = np.empty(min(PIECE, max(hi - lo, 0)), dtype=np.uint64)
    flags = np.empty(len(scratch), dtype=np.bool_)
    zero = np.uint64(zero_pfn) | _VALID | _WRITE if zero_pfn else None
    for s in stretches:
        a, b = max(s.a, lo), min(s.b, hi)
        if a >= b:
            continue
        if not s.readable:
            out[a:b] = _ERROR
            continue
        for p in range(a, b, PIECE):
            q = min(b, p + PIECE)
            r, o, t, f = raw[p:q], out[p:q], scratch[: q - p], flags[: q - p]
            np.bitwise_and(r, _PFN_VALID, out=o)  # VALID is the present bit, in place
            if o.min() < _VALID:  # a page not present: its PFN bits are a swap entry
                np.less(o, _VALID, out=f)
                np.copyto(o, _NOTHING, where=f)  # the target's swap layout is not the agent's
            if not (s.writable and may_write):
                continue
            if s.shared:
                np.right_shift(r, _ONE, out=t)  # present (63) -> WRITE (62)
                np.bitwise_and(t, _WRITE, out=t)
            else:
                # Present, exclusive, anonymous (and not uffd-wp), in one masked compare.
                np.bitwise_and(r, _EXCL_TEST_WRITE if write_fault else _EXCL_TEST, out=t)
                np.equal(t, _EXCL_WANT, out=f)
                np.multiply(f, _WRITE, out=t)
            np.bitwise_or(o, t, out=o)
            if zero is not None and not s.shared:
                # Exactly the zero page's entry with WRITE (no order bits yet): take it back.
                np.equal(o, zero, out=f)
                if f.any():
                    np.bitwise_and(o, _NOT_WRITE, out=o, where=f)


def mark_huge(out: Entries, regions: list[tuple[int, int]]) -> None:
    """Give the VALID entries of pages [lo, hi) of each region the PMD map order."""
    for lo, hi in regions:
        o = out[lo:hi]
        np.bitwise_or(o, _PMD, out=o, where=o >= _VALID)


def derive(
    raw: Raw,
    perms: Perms | list[Stretch],
    zero_pfn: int,
    write_fault: bool,
    huge: npt.NDArray[np.bool_] | None = None,
) -> Entries:
    """``derive_into`` a new array, from per-page ``Perms`` or stretches; ``huge`` marks the
    pages mapped by a PMD (``mark_huge``)."""
    out = np.empty(len(raw), dtype=np.uint64)
    stretches = perms if isinstance(perms, list) else stretches_of(perms)
    derive_into(out, raw, stretches, zero_pfn, write_fault)
    if huge is not None and huge.any():
        padded = np.concatenate(([False], huge, [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(padded))
        mark_huge(out, [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)])
    return out


def classify(
    handed: Entries, old_raw: Raw, new_raw: Raw, perms: Perms, zero_pfn: int
) -> npt.NDArray[np.int16]:
    """Return, per page, the ``Event`` that makes a handed-out entry stale, or -1.

    Only pages whose ``handed`` entry is VALID are judged: a device holds no
    translation for the others. In order of precedence: the page left every
    VMA (UNMAP); the VMA lost read, or write under a WRITE entry
    (PROTECTION_VMA); the page is gone (CLEAR); its PFN changed (MIGRATE, or
    CLEAR when the zero page or a page shared copy-on-write was replaced); it
    stopped being exclusive under a WRITE entry, as fork's COW write-protect does
    (PROTECTION_PAGE).

    A watcher's poll judges every page it holds, and nearly always finds none
    changed: only the suspects, pages whose raw entry differs, is not present,
    or lies outside a VMA that can be read and written, are judged one by one.
    Any other page keeps its translation under every rule above.
    """
    out = np.full(handed.shape, -1, dtype=np.int16)
    valid = handed >= _VALID  # bit 63 is the top bit: one compare
    if not valid.any():
        return out
    suspect = new_raw != old_raw
    suspect |= new_raw < PM_PRESENT
    for facts in (perms.covered, perms.readable, perms.writable):
        if not facts.all():
            suspect |= ~facts
    suspect &= valid
    idx = np.flatnonzero(suspect)
    if len(idx) == 0:
        return out
    if len(idx) > len(handed) // 4:  # many: judging all costs less than gathering them
        return _judge(handed, old_raw, new_raw, perms, zero_pfn)
    sub = Perms(perms.covered[idx], perms.readable[idx], perms.writable[idx], perms.shared[idx])
    out[idx] = _judge(handed[idx], old_raw[idx], new_raw[idx], sub, zero_pfn)
    return out


def _judge(
    handed: Entries, old_raw: Raw, new_raw: Raw, perms: Perms, zero_pfn: int
) -> npt.NDArray[np.int16]:
    """``classify`` of every page, by the rules in their order of precedence."""
    covered, readable, writable = perms.covered, perms.readable, perms.writable
    out = np.full(handed.shape, -1, dtype=np.int16)
    valid = (handed & _VALID) != 0
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
    # A shared page replaced by an exclusive one is a COW break, which the kernel
    # notifies as MMU_NOTIFY_CLEAR (SPEC §8); a migrated page keeps its exclusivity.
    cow = ((old_raw & PM_EXCLUSIVE) == 0) & ((new_raw & PM_EXCLUSIVE) != 0)
    out[migrate & cow] = Event.CLEAR
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

    def part(self, pages: slice) -> Perms:
        """The facts of the pages ``pages`` of this range (views, not copies)."""
        return Perms(
            self.covered[pages], self.readable[pages], self.writable[pages], self.shared[pages]
        )


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
