"""The FAULT path's walk as hmmd runs it: per VMA stretch, piece by piece, on real pagemaps.

``derive`` (``test_pagetable.py``) is one call over per-page ``Perms``. A fault
instead takes the VMAs as stretches (``vma_stretches``), walks each piece of the
range as soon as the pagemap reader hands it over (``derive_into`` from
``ProcessView.pagemap_into``, on two threads), asks PAGEMAP_SCAN about huge
pages only in the 2 MiB blocks where the PFNs allow one (``huge_regions``),
and gives its raw entries to the mirror's shadow (``Span.hand_out``). Each
must agree with the one-call form: the same entries, whatever the pieces, the
threads and the blocks asked about, and a shadow that holds what was handed out.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import mmap
import os
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from hmmirror.daemon.fault.service import (
    Pending,
    Walked,
    WalkOptions,
    attempt,
    changed_under,
    huge_regions,
    index_runs,
)
from hmmirror.daemon.frames import SECRET_BYTES, FrameTokens
from hmmirror.daemon.linux import procfs, scan
from hmmirror.daemon.linux.procfs import (
    PAGE_SHIFT,
    PM_PFN_MASK,
    ProcessView,
    start_time,
    zero_pfn,
)
from hmmirror.daemon.pagetable import (
    PIECE,
    Perms,
    derive,
    derive_into,
    first_lacking,
    stretches_of,
    vma_perms,
    vma_stretches,
)
from hmmirror.daemon.state import Mm, Span
from hmmirror.proto.entries import (
    HMM_PFN_PFN_MASK,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    PMD_ORDER,
    map_order,
    pfns,
)
from hmmirror.proto.messages import Event, FaultMode
from hypothesis import given
from hypothesis import strategies as st
from pagetable_inputs import BASE, MAX_PAGES, Walk, fast, walks
from test_pagetable import Layout, layouts

TWO_MIB = 2 << 20
PMD_PAGES = 1 << PMD_ORDER


# --- stretches -------------------------------------------------------------------------------


@fast
@given(layouts(), st.integers(0, 2 * MAX_PAGES), st.integers(0, MAX_PAGES))
def test_vma_stretches_say_what_vma_perms_says(layout: Layout, first: int, npages: int) -> None:
    """Stretches tile [0, npages) in order and give every page the facts ``vma_perms`` gives it
    (shared aside, which only counts under a readable VMA)."""
    start = BASE + (first << PAGE_SHIFT)
    stretches = vma_stretches(layout.parsed(), start, npages)
    perms = vma_perms(layout.parsed(), start, npages)
    at = 0
    for s in stretches:
        assert s.a == at and s.a < s.b, f"stretches do not tile the range: {stretches}"
        at = s.b
        assert (perms.readable[s.a : s.b] == s.readable).all()
        assert (perms.writable[s.a : s.b] == s.writable).all()
        if s.readable:
            assert (perms.shared[s.a : s.b] == s.shared).all()
    assert at == npages
    unreadable = np.flatnonzero(~perms.readable)
    unwritable = np.flatnonzero(~perms.writable)
    assert first_lacking(stretches, False) == (int(unreadable[0]) if len(unreadable) else None)
    assert first_lacking(stretches, True) == (int(unwritable[0]) if len(unwritable) else None)


@fast
@given(walks(), st.data())
def test_walking_pieces_in_any_order_gives_the_one_call_walk(w: Walk, data: st.DataObject) -> None:
    """``derive_into`` over [lo, hi) pieces, done in any order, fills the table ``derive`` makes,
    and from the stretches of the VMAs the pages came from as from their per-page facts."""
    raw, perms, _ = w.arrays()
    want = derive(raw, perms, w.zero_pfn, w.write_fault)
    n = len(raw)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, n - 1)), max_size=4), label="cuts"))
    cuts = [c for c in cuts if 0 < c < n]
    pieces = list(zip([0, *cuts], [*cuts, n], strict=True))
    order = data.draw(st.permutations(pieces), label="order")
    out = np.full(n, 0xDEAD, dtype=np.uint64)
    stretches = stretches_of(perms)
    for lo, hi in order:
        derive_into(out, raw, stretches, w.zero_pfn, w.write_fault, lo, hi)
    assert np.array_equal(out, want)


@pytest.mark.parametrize("write_fault", [False, True])
def test_a_walk_longer_than_a_piece_matches_page_by_page(write_fault: bool) -> None:
    """Across PIECE boundaries and VMA stretches that do not line up with them, the walk is
    the per-page one (``derive`` over slices a few pages long, where every page is its own)."""
    rng = np.random.default_rng(13)
    n = 2 * PIECE + 517
    flags = rng.integers(0, 16, n, dtype=np.uint64)
    raw = rng.integers(0, 1 << 40, n, dtype=np.uint64)
    for bit, mask in ((63, 1), (56, 2), (57, 4), (62, 8)):
        raw |= ((flags & np.uint64(mask)) != 0).astype(np.uint64) << np.uint64(bit)
    zero = 0x1234
    raw[::97] = np.uint64((1 << 63) | (1 << 56) | zero)  # the zero page, exclusive as it never is
    kinds = np.zeros((3, n), dtype=np.bool_)  # readable, writable, shared
    for a, b, r, wr, sh in (
        (0, 1000, True, True, False),
        (1000, PIECE + 3, True, True, True),
        (PIECE + 3, PIECE + 700, False, False, False),
        (PIECE + 700, 2 * PIECE + 100, True, False, False),
        (2 * PIECE + 100, n, True, True, False),
    ):
        kinds[:, a:b] = np.array([[r], [wr], [sh]])
    whole = derive(raw, Perms(kinds[0], kinds[0], kinds[1], kinds[2]), zero, write_fault)
    step = 61
    parts = [
        derive(
            raw[a : a + step],
            Perms(*(x[a : a + step] for x in (kinds[0], kinds[0], kinds[1], kinds[2]))),
            zero,
            write_fault,
        )
        for a in range(0, n, step)
    ]
    assert np.array_equal(whole, np.concatenate(parts))


# --- on a real pagemap -----------------------------------------------------------------------


@pytest.fixture
def own_mm() -> Iterator[Mm]:
    """This process as a watched mm."""
    pid = os.getpid()
    view = ProcessView(pid)
    pidfd = os.pidfd_open(pid)
    try:
        yield Mm(pid, start_time(pid), view, pidfd)
    finally:
        view.close()
        os.close(pidfd)


def _address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


@pytest.fixture
def region() -> Iterator[tuple[mmap.mmap, int]]:
    """8 MiB of private anonymous memory and its first 2 MiB-aligned address."""
    buf = mmap.mmap(-1, 4 * TWO_MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = _address(buf)
    try:
        yield buf, (base + TWO_MIB - 1) & ~(TWO_MIB - 1)
    finally:
        gc.collect()  # views of the buffer made by ctypes must be gone before it closes
        buf.close()


def test_pagemap_into_reports_every_piece_once_on_two_threads(
    own_mm: Mm, region: tuple[mmap.mmap, int]
) -> None:
    """A read shared with the helper thread lands every piece exactly once, and reads what
    one plain read reads."""
    buf, _ = region
    base = _address(buf)
    buf[:] = b"\1" * len(buf)
    npages = procfs.SPLIT_PAGES + 3 * procfs.PIECE_PAGES // 2  # past the split, a short last piece
    start = base - ((npages - len(buf) // 4096) << PAGE_SHIFT)  # ends with the region
    landed: list[tuple[int, int, bool]] = []
    lock = threading.Lock()

    def note(lo: int, hi: int) -> None:
        with lock:
            landed.append((lo, hi, threading.current_thread() is threading.main_thread()))

    out = np.empty(npages, dtype=np.uint64)
    own_mm.view.pagemap_into(out, start, note, shared=True)
    got = sorted((lo, hi) for lo, hi, _ in landed)
    assert got[0][0] == 0 and got[-1][1] == npages
    assert all(a[1] == b[0] for a, b in itertools.pairwise(got)), f"pieces overlap or miss: {got}"
    assert np.array_equal(out[-(len(buf) // 4096) :], own_mm.view.pagemap(base, len(buf) // 4096))


def _huge_by_scan(mm: Mm, start: int, npages: int) -> list[tuple[int, int]]:
    """What PAGEMAP_SCAN says of the whole range, as page runs."""
    end = start + (npages << PAGE_SHIFT)
    return [
        ((lo - start) >> PAGE_SHIFT, (hi - start) >> PAGE_SHIFT)
        for lo, hi in scan.regions(mm.view.pagemap_fd, start, end, scan.PAGE_IS_HUGE)
    ]


def _merged(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    mask = np.zeros(max((b for _, b in runs), default=0), dtype=np.bool_)
    for a, b in runs:
        mask[a:b] = True
    return index_runs(mask)


@pytest.mark.parametrize("hidden_pfns", [False, True], ids=["pfns", "pfns-hidden"])
def test_huge_regions_find_what_a_full_scan_finds(
    own_mm: Mm, region: tuple[mmap.mmap, int], hidden_pfns: bool
) -> None:
    """A THP block between 4 KiB pages: ranges starting and ending in the middle of the huge
    block, or of a small-page block, get exactly the huge pages a scan of the whole range
    reports; with PFNs hidden (an unprivileged hmmd reads PFN 0) too."""
    buf, aligned = region
    base = _address(buf)
    off = aligned - base
    buf.madvise(mmap.MADV_NOHUGEPAGE, 0, len(buf))
    buf.madvise(mmap.MADV_HUGEPAGE, off + TWO_MIB, TWO_MIB)
    buf[:] = b"\1" * len(buf)
    whole = _huge_by_scan(own_mm, aligned, 3 * PMD_PAGES)
    assert whole == [(PMD_PAGES, 2 * PMD_PAGES)], (
        f"no THP where MADV_HUGEPAGE asked for one (scan says {whole}): the test needs one"
    )
    for first, npages in (
        (0, 3 * PMD_PAGES),
        (PMD_PAGES + 5, PMD_PAGES),  # starts inside the huge page, ends in the next block
        (7, PMD_PAGES + 9),  # ends inside it
        (PMD_PAGES + 1, 3),  # a few pages of it
        (3, 100),  # none of it
    ):
        start = aligned + (first << PAGE_SHIFT)
        raw = own_mm.view.pagemap(start, npages)
        if hidden_pfns:
            raw &= ~PM_PFN_MASK
        got = _merged(huge_regions(own_mm, start, raw))
        assert got == _huge_by_scan(own_mm, start, npages), f"range +{first} pages, {npages}"


def test_small_pages_cost_no_scan_of_the_range(own_mm: Mm, region: tuple[mmap.mmap, int]) -> None:
    """4 KiB pages whose PFNs cannot sit under a PMD are not asked about at all: a pagemap
    whose every block starts misaligned gives no huge region, whatever PAGEMAP_SCAN would say."""
    buf, aligned = region
    buf.madvise(mmap.MADV_NOHUGEPAGE, 0, len(buf))
    buf[:] = b"\1" * len(buf)
    npages = 3 * PMD_PAGES
    raw = own_mm.view.pagemap(aligned, npages)
    # PFNs one off alignment in every block's first page: no PMD can map them.
    raw[::PMD_PAGES] = (raw[::PMD_PAGES] & ~PM_PFN_MASK) | np.uint64(PMD_PAGES + 1)
    assert huge_regions(own_mm, aligned, raw) == []


def test_a_fault_walk_of_a_real_range_marks_huge_pages(
    own_mm: Mm, region: tuple[mmap.mmap, int]
) -> None:
    """``attempt`` over THP and small pages: VALID everywhere, PMD order exactly on the THP,
    in the shadow and the wire entries alike; the wire's frame tokens where asked for, and
    no WRITE for a mirror without WRITE access."""
    buf, aligned = region
    off = aligned - _address(buf)
    buf.madvise(mmap.MADV_NOHUGEPAGE, 0, len(buf))
    buf.madvise(mmap.MADV_HUGEPAGE, off, TWO_MIB)
    buf[:] = b"\1" * len(buf)
    npages = 2 * PMD_PAGES
    zero = zero_pfn()
    got = attempt(own_mm, aligned, npages, False, FaultMode.POPULATE, zero)
    assert isinstance(got, Walked)
    entries, shadow, raw = got.entries, got.shadow, got.raw
    assert entries is not shadow and np.array_equal(entries, shadow)
    assert (entries >= np.uint64(HMM_PFN_VALID | HMM_PFN_WRITE)).all()
    want = np.zeros(npages, dtype=np.uint64)
    for a, b in _huge_by_scan(own_mm, aligned, npages):
        want[a:b] = PMD_ORDER
    assert want.any(), "no THP where MADV_HUGEPAGE asked for one: the test needs one"
    assert np.array_equal(map_order(entries), want)
    assert np.array_equal(pfns(entries), raw & np.uint64(HMM_PFN_PFN_MASK))

    tokens = FrameTokens(bytes(range(SECRET_BYTES)))
    got = attempt(
        own_mm, aligned, npages, False, FaultMode.POPULATE, zero, WalkOptions(True, tokens)
    )
    assert isinstance(got, Walked)
    assert np.array_equal(got.shadow, shadow), "the shadow keeps PFNs"
    tokenized = shadow.copy()
    tokens.tokenize(tokenized)
    assert np.array_equal(got.entries, tokenized)

    got = attempt(own_mm, aligned, npages, True, FaultMode.POPULATE, zero, WalkOptions(False))
    assert isinstance(got, Walked)
    assert np.array_equal(got.shadow, shadow & ~np.uint64(HMM_PFN_WRITE))
    assert np.array_equal(got.entries, got.shadow)


def test_a_populate_walk_over_missing_pages_is_pending(
    own_mm: Mm, region: tuple[mmap.mmap, int]
) -> None:
    """A page not present anywhere in the range makes a POPULATE walk Pending with exactly
    the missing runs, whichever piece (and thread) met it; PRESENT mode walks on."""
    buf, aligned = region
    base = _address(buf)
    buf[:] = b"\1" * len(buf)
    buf.madvise(mmap.MADV_DONTNEED, aligned - base + 7 * 4096, 3 * 4096)
    npages = 3 * PMD_PAGES
    got = attempt(own_mm, aligned, npages, False, FaultMode.POPULATE, zero_pfn())
    assert got == Pending(busy=False, runs=[(aligned + 7 * 4096, 3 * 4096)])
    got = attempt(own_mm, aligned, npages, False, FaultMode.PRESENT, zero_pfn())
    assert isinstance(got, Walked)
    assert not (got.entries[7:10] & np.uint64(HMM_PFN_VALID)).any()
    assert (got.entries[10:] >= np.uint64(HMM_PFN_VALID)).all()


# --- the shadow ------------------------------------------------------------------------------


@pytest.mark.parametrize("all_valid", [True, False])
def test_a_whole_span_hand_out_keeps_the_arrays_it_is_given(all_valid: bool) -> None:
    """The shadow of a whole-span hand-out is the two arrays given (pages not VALID zeroed),
    not copies; a later partial hand-out and a zap work on them as on the span's own."""
    n = 64
    span = Span(BASE, BASE + (n << PAGE_SHIFT))
    entries = np.arange(n, dtype=np.uint64) | np.uint64(HMM_PFN_VALID)
    if not all_valid:
        entries[::3] = 0
    raw = np.arange(n, dtype=np.uint64) + np.uint64(1000)
    want_handed = np.where(entries >= np.uint64(HMM_PFN_VALID), entries, np.uint64(0))
    want_raw = np.where(entries >= np.uint64(HMM_PFN_VALID), raw, np.uint64(0))
    span.hand_out(BASE, entries, raw)
    assert span.handed is entries and span.raw is raw
    assert np.array_equal(span.handed, want_handed)
    assert np.array_equal(span.raw, want_raw)
    assert span.held == int(np.count_nonzero(want_handed))
    span.hand_out(BASE, np.full(4, HMM_PFN_VALID | 5, dtype=np.uint64), np.full(4, 9, np.uint64))
    span.zap(BASE + (60 << PAGE_SHIFT), BASE + (n << PAGE_SHIFT))
    assert span.handed[0] == HMM_PFN_VALID | 5 and span.raw[0] == 9
    assert not span.handed[60:].any() and not span.raw[60:].any()
    assert span.held == int(np.count_nonzero(span.handed))
    # A view of another array is copied, not kept: its owner may still change it.
    view = np.full(2 * n, HMM_PFN_VALID, dtype=np.uint64)[:n]
    span.hand_out(BASE, view, np.zeros(n, dtype=np.uint64))
    assert span.handed is not view and np.array_equal(span.handed, view)


def test_a_hand_out_keeps_an_earlier_write_entry_for_the_same_frame() -> None:
    """Replies may reach the agent in another order than their hand-outs: an earlier WRITE
    entry for the same frame stays in the shadow under a later read-only one; an entry for
    another frame does not keep it (its change is invalidated first: the next test)."""
    span = Span(BASE, BASE + (4 << PAGE_SHIFT))
    valid, write = np.uint64(HMM_PFN_VALID), np.uint64(HMM_PFN_WRITE)
    raw = np.full(2, 77, dtype=np.uint64)
    span.hand_out(BASE, np.array([5, 6], dtype=np.uint64) | valid | write, raw.copy())
    span.hand_out(BASE, np.array([5, 9], dtype=np.uint64) | valid, raw.copy())
    assert span.handed[0] == 5 | valid | write
    assert span.handed[1] == 9 | valid
    assert span.held == 2


def test_a_walk_names_the_changes_under_entries_already_held(
    own_mm: Mm, region: tuple[mmap.mmap, int]
) -> None:
    """What a fault's walk finds changed under held entries, by the watcher's rules: a
    frame held that is another now (MIGRATE); a WRITE entry in a VMA that lost write."""
    buf, aligned = region
    buf[:] = b"\1" * len(buf)
    zero = zero_pfn()
    span = Span(aligned, aligned + (4 << PAGE_SHIFT))
    first = attempt(own_mm, aligned, 4, True, FaultMode.POPULATE, zero)
    assert isinstance(first, Walked)
    assert changed_under(span, aligned, first, zero) == []  # nothing held yet
    shadow, raw = first.shadow.copy(), first.raw.copy()
    shadow[1] ^= np.uint64(1)  # as if page 1 had been handed out on another frame
    raw[1] ^= np.uint64(1)
    span.hand_out(aligned, shadow, raw)
    again = attempt(own_mm, aligned, 4, False, FaultMode.POPULATE, zero)
    assert isinstance(again, Walked)
    page = 1 << PAGE_SHIFT
    assert changed_under(span, aligned, again, zero) == [
        (aligned + page, aligned + 2 * page, Event.MIGRATE)
    ]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(aligned + 3 * page, page, mmap.PROT_READ) == 0
    try:
        walked = attempt(own_mm, aligned, 4, False, FaultMode.POPULATE, zero)
        assert isinstance(walked, Walked)
        assert changed_under(span, aligned, walked, zero) == [
            (aligned + page, aligned + 2 * page, Event.MIGRATE),
            (aligned + 3 * page, aligned + 4 * page, Event.PROTECTION_VMA),
        ]
    finally:
        libc.mprotect(aligned + 3 * page, page, mmap.PROT_READ | mmap.PROT_WRITE)
