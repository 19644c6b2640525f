"""Property tests of hmmd's change detector: ``classify`` and ``runs`` (``daemon.pagetable``).

``classify`` judges each handed-out entry against a new pagemap read and the VMAs
and names the event that makes it stale, by a fixed precedence; ``runs`` groups
the verdicts into maximal [start, end) runs. Both are compared with per-page
reference models written from their docstrings. Further properties tie the
detector to the walk (``derive``): a fresh walk judged against the same read is
never stale, and a page that goes away or leaves its VMA makes exactly the VALID
entries stale.
"""

from __future__ import annotations

import itertools

import numpy as np
from hmmirror.daemon.linux.procfs import PAGE_SHIFT
from hmmirror.daemon.pagetable import Perms, classify, derive, runs
from hmmirror.proto.entries import HMM_PFN_ERROR, HMM_PFN_VALID, HMM_PFN_WRITE
from hmmirror.proto.messages import Event
from hypothesis import given
from hypothesis import strategies as st
from pagetable_inputs import (
    BASE,
    EXCL,
    KINDS,
    MAX_PAGES,
    PFN_MASK,
    PRESENT,
    ZERO_PFN,
    Kind,
    Walk,
    code_st,
    fast,
    kind_st,
    perms_of,
    pfn_of,
    raw_entry,
    raw_of,
    uniform_or_mixed,
    walks,
)

# --- classify --------------------------------------------------------------------------------


def ref_classify(
    handed: int, old: int, new: int, kind: Kind, zero_pfn: int
) -> int:  # fmt: skip
    """The event that makes one handed-out entry stale, or -1, by the docstring's precedence."""
    if not handed & HMM_PFN_VALID:
        return -1  # the device holds nothing here
    had_write = bool(handed & HMM_PFN_WRITE)
    if not kind.covered:
        return Event.UNMAP
    if not kind.readable or (had_write and not kind.writable):
        return Event.PROTECTION_VMA
    if not new & PRESENT:
        return Event.CLEAR
    old_pfn, new_pfn = old & PFN_MASK, new & PFN_MASK
    if old_pfn != new_pfn:
        if zero_pfn and old_pfn == zero_pfn:
            return Event.CLEAR  # the zero page replaced
        if not old & EXCL and new & EXCL:
            return Event.CLEAR  # a COW break: a shared page replaced by an exclusive one
        return Event.MIGRATE
    if had_write and old & EXCL and not new & EXCL:
        return Event.PROTECTION_PAGE
    return -1


def handed_of(code: int) -> int:
    """An entry the daemon might have handed out: nothing, ERROR, or VALID with or without WRITE."""
    shape, rest = code % 5, code // 5
    if shape == 0:
        return 0
    if shape == 1:
        return HMM_PFN_ERROR
    return HMM_PFN_VALID | (HMM_PFN_WRITE if shape > 2 else 0) | pfn_of(rest)


def changed(old: int, code: int) -> int:
    """A new read of a page: often the old entry with one thing changed, so that each verdict
    is reached; sometimes anything."""
    how, rest = code % 6, code // 6
    if how <= 1:
        return old
    if how == 2:
        return 0  # gone
    if how == 3:
        return (old & ~PFN_MASK) | PRESENT | pfn_of(rest)  # moved (or replaced)
    if how == 4:
        return old & ~EXCL  # shared now, as after fork
    return raw_of(rest)


@st.composite
def changes(draw: st.DrawFn) -> tuple[list[int], list[int], list[int], list[Kind], int]:
    """Handed entries, the raw entries they came from, a new read of the same pages, VMAs."""
    n = draw(st.integers(1, MAX_PAGES))
    handed = draw(uniform_or_mixed(code_st.map(handed_of), n))
    old = draw(st.lists(raw_entry, min_size=n, max_size=n))
    how = draw(st.lists(code_st, min_size=n, max_size=n))
    new = [changed(o, c) for o, c in zip(old, how, strict=True)]
    kinds = draw(uniform_or_mixed(kind_st, n))
    zero_pfn = draw(st.sampled_from([0, ZERO_PFN, ZERO_PFN]))
    return handed, old, new, kinds, zero_pfn  # type: ignore[return-value]


def u64(xs: list[int]) -> np.ndarray:
    """A list of ints as a u64 array."""
    return np.array(xs, dtype=np.uint64)


@fast
@given(changes())
def test_classify_matches_the_reference_model(
    c: tuple[list[int], list[int], list[int], list[Kind], int],
) -> None:
    handed, old, new, kinds, zero_pfn = c
    got = classify(u64(handed), u64(old), u64(new), perms_of(kinds), zero_pfn)
    assert got.dtype == np.int16
    want = [
        ref_classify(h, o, n, k, zero_pfn)
        for h, o, n, k in zip(handed, old, new, kinds, strict=True)
    ]
    assert [int(e) for e in got] == want


@fast
@given(changes(), st.sampled_from(["rw_private", "rw_shared", "r_private"]))
def test_classify_judges_a_few_changes_among_many_held_pages(
    c: tuple[list[int], list[int], list[int], list[Kind], int], quiet_kind: str
) -> None:
    """A poll's usual table: the drawn pages among many more, held and unchanged in a VMA
    where nothing is wrong. Only the few are judged one by one (``classify`` gathers its
    suspects), and every verdict is still the model's; the quiet pages report nothing."""
    handed, old, new, kinds, zero_pfn = c
    pad = 4 * len(handed) + 8
    quiet = KINDS[quiet_kind]
    handed = [HMM_PFN_VALID | 7] * pad + handed + [HMM_PFN_VALID | HMM_PFN_WRITE | 9] * pad
    quiet_raw = [PRESENT | EXCL | 7] * pad, [PRESENT | 9] * pad
    old = quiet_raw[0] + old + quiet_raw[1]
    new = quiet_raw[0] + new + quiet_raw[1]
    kinds = [quiet] * pad + kinds + [quiet] * pad
    got = classify(u64(handed), u64(old), u64(new), perms_of(kinds), zero_pfn)
    want = [
        ref_classify(h, o, n, k, zero_pfn)
        for h, o, n, k in zip(handed, old, new, kinds, strict=True)
    ]
    assert [int(e) for e in got] == want


@fast
@given(walks())
def test_a_fresh_walk_of_an_unchanged_table_is_not_stale(w: Walk) -> None:
    """What ``derive`` hands out, judged against the same pagemap read, reports no event."""
    raw, perms, huge = w.arrays()
    handed = derive(raw, perms, w.zero_pfn, w.write_fault, huge)
    events = classify(handed, raw, raw.copy(), perms, w.zero_pfn)
    assert (events == -1).all()
    assert runs(events, BASE) == []


@fast
@given(walks())
def test_every_change_under_a_valid_entry_is_reported(w: Walk) -> None:
    """The page leaving its VMA, or going away, makes every VALID entry stale and no other."""
    raw, perms, huge = w.arrays()
    handed = derive(raw, perms, w.zero_pfn, w.write_fault, huge)
    valid = (handed & np.uint64(HMM_PFN_VALID)) != 0
    n = len(raw)
    unmapped = Perms(*(np.zeros(n, dtype=np.bool_) for _ in range(4)))
    gone = classify(handed, raw, np.zeros(n, dtype=np.uint64), perms, w.zero_pfn)
    left = classify(handed, raw, raw, unmapped, w.zero_pfn)
    assert np.array_equal(gone == Event.CLEAR, valid) and (gone[~valid] == -1).all()
    assert np.array_equal(left == Event.UNMAP, valid) and (left[~valid] == -1).all()


# --- runs ------------------------------------------------------------------------------------


def ref_runs(events: list[int], start: int) -> list[tuple[int, int, Event]]:
    """Maximal runs of one event over consecutive pages, by a plain scan."""
    out: list[tuple[int, int, Event]] = []
    for i, e in enumerate(events):
        if e < 0:
            continue
        lo, hi = start + (i << PAGE_SHIFT), start + ((i + 1) << PAGE_SHIFT)
        if out and out[-1][1] == lo and out[-1][2] == e:
            out[-1] = (out[-1][0], hi, out[-1][2])
        else:
            out.append((lo, hi, Event(e)))
    return out


event_st = st.sampled_from([-1, -1, -1, *(int(e) for e in Event)])


@fast
@given(st.lists(event_st, max_size=MAX_PAGES), st.integers(0, 1 << 20))
def test_runs_matches_the_reference_model(events: list[int], start_page: int) -> None:
    start = start_page << PAGE_SHIFT
    got = runs(np.array(events, dtype=np.int16), start)
    assert got == ref_runs(events, start)
    assert all(isinstance(e, Event) for _, _, e in got)


@fast
@given(st.lists(st.sampled_from([-1, int(Event.CLEAR), int(Event.MIGRATE)]), max_size=MAX_PAGES))
def test_runs_cover_exactly_the_judged_pages(events: list[int]) -> None:
    """Expanding the runs gives the per-page events back; neighbouring runs always differ."""
    got = runs(np.array(events, dtype=np.int16), BASE)
    back = [-1] * len(events)
    for lo, hi, e in got:
        assert lo < hi and (lo - BASE) % (1 << PAGE_SHIFT) == 0
        for p in range((lo - BASE) >> PAGE_SHIFT, (hi - BASE) >> PAGE_SHIFT):
            assert back[p] == -1, "runs overlap"
            back[p] = int(e)
    assert back == events
    for (_, hi, e), (lo, _, f) in itertools.pairwise(got):
        assert hi < lo or e != f, "two touching runs of one event should be one"
