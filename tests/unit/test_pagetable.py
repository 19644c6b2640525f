"""Property tests of hmmd's page-table walk: ``derive`` and ``vma_perms`` (``daemon.pagetable``).

``derive`` is the daemon's ``hmm_range_fault``: pagemap entries plus per-page VMA
facts become ``hmm_pfn`` entries; ``vma_perms`` computes those facts from the
parsed maps. Both are vectorised, with fast paths for the uniform cases (every
page readable, every page writable, no shared VMA, no zero page known, no huge
pages); the inputs (``pagetable_inputs``) reach the fast and the mixed paths.

Each is compared with a per-page reference model written from its docstring and
SPEC.md §7.2 (plain Python ints, one page at a time). Further
properties state the contract directly: a page that is not present is never
VALID, WRITE implies VALID and a writable VMA, an unreadable page is exactly
ERROR, a write fault only widens WRITE, the walk of a range is the concatenation
of the walks of its halves, and the inputs are left alone. What a non-VALID,
non-ERROR entry carries below its flags is deliberately not judged: nobody reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from hmmirror.daemon.linux.procfs import PAGE_SHIFT, PM_FILE, PM_PFN_MASK, PM_SWAPPED, Vmas
from hmmirror.daemon.pagetable import Perms, derive, vma_perms
from hmmirror.proto.entries import (
    HMM_PFN_ERROR,
    HMM_PFN_ORDER_SHIFT,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    PMD_ORDER,
    map_order,
    pfns,
)
from hypothesis import example, given
from hypothesis import strategies as st
from pagetable_inputs import (
    BASE,
    EXCL,
    KINDS,
    MAX_PAGES,
    PFN_MASK,
    PRESENT,
    UFFD_WP,
    ZERO_PFN,
    Kind,
    Walk,
    fast,
    sliced,
    walks,
)

FLAGS = HMM_PFN_VALID | HMM_PFN_WRITE | HMM_PFN_ERROR
PMD_BITS = PMD_ORDER << HMM_PFN_ORDER_SHIFT


# --- the reference model ---------------------------------------------------------------------


def ref_entry(raw: int, kind: Kind, zero_pfn: int, write_fault: bool, huge: bool) -> int:
    """One page of ``hmm_range_fault`` as the docstring and kernel contract state it.

    Unreadable (or uncovered) page: exactly ERROR. Not present: not VALID, not WRITE
    (its low bits are not an entry and are not judged). Present: VALID and the PFN;
    WRITE where ``pte_write`` would be set: a writable shared VMA, or a writable
    private VMA whose page is exclusively mapped, anonymous (not PM_FILE), not the
    zero page and (on a read fault) not uffd-write-protected. A page shared
    copy-on-write gets no WRITE even on a write fault: hmmd breaks COW first. A huge
    page carries the PMD map order.
    """
    if not kind.readable:
        return HMM_PFN_ERROR
    pfn = raw & PFN_MASK
    if not raw & PRESENT:
        return pfn  # compared on its flag bits only; see same_entry
    out = pfn | HMM_PFN_VALID
    if kind.writable:
        if kind.shared:
            writes = True
        else:
            exclusive = bool(raw & EXCL) and not raw & int(PM_FILE)
            exclusive = exclusive and (write_fault or not raw & UFFD_WP)
            writes = exclusive and not (zero_pfn and pfn == zero_pfn)
        if writes:
            out |= HMM_PFN_WRITE
    if huge:
        out |= PMD_BITS
    return out


def same_entry(got: int, want: int) -> bool:
    """Equal entries; for one that is neither VALID nor ERROR, only the flag bits count."""
    if want & (HMM_PFN_VALID | HMM_PFN_ERROR):
        return got == want
    return got & FLAGS == 0


def ref_derive(w: Walk) -> list[int]:
    """The reference walk of a whole range."""
    huge = w.huge if w.huge is not None else [False] * len(w.raw)
    return [
        ref_entry(r, k, w.zero_pfn, w.write_fault, h)
        for r, k, h in zip(w.raw, w.kinds, huge, strict=True)
    ]


# --- derive ----------------------------------------------------------------------------------


def one_page(raw: int, kind: str, write_fault: bool = False, huge: bool = False) -> Walk:
    """A one-page walk, with the zero page known."""
    return Walk([raw], [KINDS[kind]], ZERO_PFN, write_fault, [huge])


#: One page for each rule that decides a bit, so that each is checked on every run, however
#: rarely the random draws combine into it: the exclusive zero page and a uffd-wp page in a
#: writable private VMA (no WRITE on a read fault), a COW-shared page and a file's page in a
#: private VMA (no WRITE, even on a write fault: hmmd breaks COW first), a uffd-wp page under
#: a write fault (WRITE), a shared VMA (WRITE without exclusivity), a read-only VMA under a
#: write fault, a present page under PROT_NONE, a swapped page, and a huge page.
CORNERS = [
    one_page(PRESENT | EXCL | ZERO_PFN, "rw_private"),
    one_page(PRESENT | EXCL | UFFD_WP | 7, "rw_private"),
    one_page(PRESENT | 7, "rw_private"),
    one_page(PRESENT | 7, "rw_private", write_fault=True),
    one_page(PRESENT | EXCL | int(PM_FILE) | 7, "rw_private", write_fault=True),
    one_page(PRESENT | EXCL | UFFD_WP | 7, "rw_private", write_fault=True),
    one_page(PRESENT | 7, "rw_shared"),
    one_page(PRESENT | EXCL | 7, "r_private", write_fault=True),
    one_page(PRESENT | EXCL | 7, "prot_none"),
    one_page(int(PM_SWAPPED) | EXCL | 7, "rw_private", write_fault=True, huge=True),
    one_page(PRESENT | EXCL | 7, "rw_private", huge=True),
]


def corners(test: Callable[[Walk], None]) -> Callable[[Walk], None]:
    """Add every corner page as an explicit example of a ``@given(walks())`` test."""
    for walk in CORNERS:
        test = example(walk)(test)
    return test


@fast
@corners
@given(walks())
def test_derive_matches_the_reference_model(w: Walk) -> None:
    got, want = w.derive(), ref_derive(w)
    bad = [
        (i, hex(g), hex(x)) for i, (g, x) in enumerate(zip(got, want, strict=True))
        if not same_entry(g, x)
    ]  # fmt: skip
    assert not bad, f"pages differ from the model (page, got, want): {bad[:4]}"


@fast
@corners
@given(walks())
def test_derive_flag_invariants(w: Walk) -> None:
    """The contract in one-line rules, independent of how the model is written."""
    got = w.derive()
    for e, r, k in zip(got, w.raw, w.kinds, strict=True):
        valid, write, error = (
            bool(e & HMM_PFN_VALID),
            bool(e & HMM_PFN_WRITE),
            bool(e & HMM_PFN_ERROR),
        )
        if not k.readable:
            assert e == HMM_PFN_ERROR, "an unreadable page is exactly ERROR"
            continue
        assert not error, "a readable page is never ERROR"
        assert valid == bool(r & PRESENT), "VALID exactly where the page is present"
        if not valid:
            assert e == 0, "a page not present hands out nothing (no swap entry bits)"
        if write:
            assert valid, "WRITE without VALID"
            assert k.writable, "WRITE in a VMA that is not writable"
        if (
            valid
            and not w.write_fault
            and not k.shared
            and (w.zero_pfn and r & PFN_MASK == w.zero_pfn)
        ):
            assert not write, "the zero page is never writable on a read fault"
        if valid and not w.write_fault and not k.shared and r & UFFD_WP:
            assert not write, "a uffd-write-protected private page is never writable"


def test_a_swapped_page_hands_out_nothing_of_its_swap_entry() -> None:
    """pagemap gives a swapped-out page's swap type and offset where a PFN would be: they
    describe the target's swap device, not the agent's business (found by review)."""
    swapped = PM_SWAPPED | (3 << 0) | (0x12345 << 5)  # type 3, offset 0x12345
    raw = np.array([swapped, 0, PRESENT | 77], dtype=np.uint64)
    perms = Perms(*(np.ones(3, dtype=np.bool_),) * 3, np.zeros(3, dtype=np.bool_))
    assert [int(e) for e in derive(raw, perms, 0, False)] == [0, 0, HMM_PFN_VALID | 77]


@fast
@given(walks())
def test_valid_entries_carry_the_pfn_and_order(w: Walk) -> None:
    raw, perms, huge = w.arrays()
    out = derive(raw, perms, w.zero_pfn, w.write_fault, huge)
    valid = (out & np.uint64(HMM_PFN_VALID)) != 0
    real = (raw & PM_PFN_MASK) < np.uint64(1 << HMM_PFN_ORDER_SHIFT)  # fits below the order
    check = valid & real
    assert np.array_equal(pfns(out)[check], (raw & PM_PFN_MASK)[check])
    want_order = np.where(huge if huge is not None else False, PMD_ORDER, 0).astype(np.uint64)
    want_order = np.broadcast_to(want_order, out.shape)
    assert np.array_equal(map_order(out)[check], want_order[check])


@fast
@given(walks())
def test_write_fault_only_widens_write(w: Walk) -> None:
    """A write fault changes no bit but WRITE, and only adds it."""
    read = Walk(w.raw, w.kinds, w.zero_pfn, False, w.huge).derive()
    write = Walk(w.raw, w.kinds, w.zero_pfn, True, w.huge).derive()
    for r, wr in zip(read, write, strict=True):
        assert r & ~HMM_PFN_WRITE == wr & ~HMM_PFN_WRITE
        assert not (r & HMM_PFN_WRITE) or wr & HMM_PFN_WRITE


@fast
@given(walks(min_pages=2), st.data())
def test_derive_of_a_range_is_the_concatenation_of_its_halves(w: Walk, data: st.DataObject) -> None:
    """Page i's entry depends on page i alone: any split walks to the same table (and a split
    can turn a mixed range into uniform halves, so the fast paths meet the slow ones)."""
    cut = data.draw(st.integers(1, len(w.raw) - 1), label="cut")
    raw, perms, huge = w.arrays()
    whole = derive(raw, perms, w.zero_pfn, w.write_fault, huge)
    parts = [
        derive(
            raw[a:b].copy(),
            sliced(perms, a, b),
            w.zero_pfn,
            w.write_fault,
            None if huge is None else huge[a:b],
        )
        for a, b in ((0, cut), (cut, len(raw)))
    ]
    assert np.array_equal(whole, np.concatenate(parts))


@fast
@given(walks())
def test_derive_leaves_its_inputs_alone(w: Walk) -> None:
    raw, perms, huge = w.arrays()
    before = (raw.copy(), perms.readable.copy(), perms.writable.copy(), perms.shared.copy())
    out = derive(raw, perms, w.zero_pfn, w.write_fault, huge)
    assert out is not raw
    assert np.array_equal(raw, before[0])
    assert np.array_equal(perms.readable, before[1])
    assert np.array_equal(perms.writable, before[2])
    assert np.array_equal(perms.shared, before[3])
    assert out.dtype == np.uint64 and out.shape == raw.shape


# --- vma_perms -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A process's VMAs, in pages from BASE: sorted, disjoint, maybe adjacent, maybe special."""

    vmas: list[tuple[int, int, str, bool]]  # (first page, end page, kind name, special)

    def parsed(self) -> Vmas:
        """The layout as ``parse_maps`` would return it."""
        k = [KINDS[name] for _, _, name, _ in self.vmas]
        return Vmas(
            np.array([BASE + (a << PAGE_SHIFT) for a, _, _, _ in self.vmas], dtype=np.uint64),
            np.array([BASE + (b << PAGE_SHIFT) for _, b, _, _ in self.vmas], dtype=np.uint64),
            np.array([x.readable for x in k], dtype=np.bool_),
            np.array([x.writable for x in k], dtype=np.bool_),
            np.array([x.shared for x in k], dtype=np.bool_),
            np.array([s for _, _, _, s in self.vmas], dtype=np.bool_),
            (),
        )

    def kind_at(self, page: int) -> Kind:
        """The reference: the facts of the one VMA holding ``page`` (a linear search)."""
        for a, b, name, special in self.vmas:
            if a <= page < b:
                k = KINDS[name]
                readable = k.readable and not special
                return Kind(True, readable, readable and k.writable, k.shared)
        return KINDS["none"]


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    """Up to six VMAs within pages [0, 2 * MAX_PAGES), gaps allowed."""
    cuts = sorted(draw(st.sets(st.integers(0, 2 * MAX_PAGES), max_size=12)))
    vmas = []
    for a, b in zip(cuts[::2], cuts[1::2], strict=False):
        if a < b:
            name = draw(st.sampled_from([n for n in KINDS if n != "none"]))
            vmas.append((a, b, name, draw(st.booleans()) and draw(st.booleans())))
    if draw(st.booleans()) and len(vmas) > 1:  # make two neighbours touch
        a, _, name, special = vmas[1]
        vmas[1] = (vmas[0][1], vmas[1][1], name, special)
    return Layout(vmas)


def as_kinds(perms: Perms) -> list[Kind]:
    """The ``Perms`` arrays as a list of per-page kinds."""
    return [
        Kind(bool(c), bool(r), bool(w), bool(s))
        for c, r, w, s in zip(
            perms.covered, perms.readable, perms.writable, perms.shared, strict=True
        )
    ]


@fast
@given(layouts(), st.integers(0, 2 * MAX_PAGES), st.integers(0, MAX_PAGES))
def test_vma_perms_matches_the_reference_model(layout: Layout, first: int, npages: int) -> None:
    perms = vma_perms(layout.parsed(), BASE + (first << PAGE_SHIFT), npages)
    got = as_kinds(perms)
    want = [layout.kind_at(first + i) for i in range(npages)]
    # shared is only meaningful under a VMA; the walk never reads it elsewhere
    assert [g if g.covered else KINDS["none"] for g in got] == want


@fast
@given(layouts(), st.integers(0, 2 * MAX_PAGES), st.integers(2, MAX_PAGES), st.data())
def test_vma_perms_of_a_range_is_the_concatenation_of_its_halves(
    layout: Layout, first: int, npages: int, data: st.DataObject
) -> None:
    cut = data.draw(st.integers(1, npages - 1), label="cut")
    vmas = layout.parsed()
    start = BASE + (first << PAGE_SHIFT)
    whole = as_kinds(vma_perms(vmas, start, npages))
    left = as_kinds(vma_perms(vmas, start, cut))
    right = as_kinds(vma_perms(vmas, start + (cut << PAGE_SHIFT), npages - cut))
    assert whole == left + right
