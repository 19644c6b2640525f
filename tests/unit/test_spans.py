"""Property tests of the shadow zaps in ``hmmirror.daemon.state``: ``Span`` and ``Mirror``.

A ``Span`` keeps, per page, the entry hmmd handed to the agent and the raw
pagemap entry it came from (VALID entries only), and ``held``, how many are
VALID. When an invalidation is sent, the fan-out zaps the range from every
overlapping mirror; later changes are then judged against the shadow that is
left. So a zap must clear exactly the pages of [start, end) that the span holds,
leave every other page bit-for-bit alone, and take exactly the cleared pages off
``held`` (the fan-out skips mirrors whose spans hold nothing), whatever the
range: inside, partly over either edge, over a gap between spans, empty,
reversed, or outside every span.

The spans are compared with a model, a dict from page to (entry, raw) per span,
after every step of a drawn sequence of hand-outs and zaps. Ranges are
page-aligned, as every range hmmd zaps is (``pagetable.runs``, event ranges).
No mocks: a ``Mirror`` here sits on a real ``Mm`` of this process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
from hmmirror.daemon.linux.procfs import PAGE_SHIFT, ProcessView, start_time
from hmmirror.daemon.state import Mirror, Mm, Session, Span
from hmmirror.proto.entries import (
    HMM_PFN_ERROR,
    HMM_PFN_PFN_MASK,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
)
from hmmirror.proto.messages import Access
from hypothesis import given, settings
from hypothesis import strategies as st

#: Where the drawn spans start: a page-aligned user address.
BASE = 0x7F00_0000_0000
#: The page universe: spans lie in [0, PAGES), ranges reach SLACK pages beyond it.
PAGES = 64
SLACK = 8
#: Examples per property: small enough for 2 shared vCPUs.
EXAMPLES = 75

fast = settings(deadline=None, max_examples=EXAMPLES)


def addr(page: int) -> int:
    """The address of a page of the universe (negative pages lie below BASE)."""
    return BASE + (page << PAGE_SHIFT)


# --- the model -------------------------------------------------------------------------------


@dataclass
class Shadow:
    """The model of one span: the pages it holds, page -> (entry, raw)."""

    first: int
    end: int
    held: dict[int, tuple[int, int]] = field(default_factory=dict)

    def hand_out(self, page: int, entries: list[int], raws: list[int]) -> None:
        """The agent now has ``entries`` from ``page``: VALID ones are held, others forgotten.

        A VALID entry for the frame of a WRITE entry held already keeps the WRITE bit: the
        agent may install the earlier reply last (``Span.hand_out``)."""
        for i, (e, r) in enumerate(zip(entries, raws, strict=True)):
            if e & HMM_PFN_VALID:
                old = self.held.get(page + i, (0, 0))[0]
                if old & HMM_PFN_WRITE and not (old ^ e) & HMM_PFN_PFN_MASK:
                    e |= HMM_PFN_WRITE
                self.held[page + i] = (e, r)
            else:
                self.held.pop(page + i, None)

    def zap(self, lo: int, hi: int) -> int:
        """Forget the held pages in [lo, hi); how many there were."""
        gone = [p for p in self.held if lo <= p < hi]
        for p in gone:
            del self.held[p]
        return len(gone)

    def check(self, span: Span) -> None:
        """The span's arrays and counter agree with the model."""
        n = self.end - self.first
        handed = [self.held.get(self.first + i, (0, 0))[0] for i in range(n)]
        raw = [self.held.get(self.first + i, (0, 0))[1] for i in range(n)]
        assert [int(x) for x in span.handed] == handed, "handed entries differ from the model"
        assert [int(x) for x in span.raw] == raw, "raw shadow differs from the model"
        assert span.held == len(self.held), f"held is {span.held}, {len(self.held)} are VALID"


# --- strategies ------------------------------------------------------------------------------


def entry_of(code: int) -> int:
    """A fault reply's entry from a drawn code: VALID (maybe WRITE) when bit 0 is set, else
    one that is not VALID (none, ERROR, leftover low bits)."""
    if code & 1:
        return HMM_PFN_VALID | (HMM_PFN_WRITE if code & 2 else 0) | (code >> 2)
    return (0, HMM_PFN_ERROR, 1, (1 << 55) - 1)[(code >> 1) & 3]


def raw_of(code: int) -> int:
    """A raw pagemap entry to go with the entry of ``code`` (distinct per code; one draw)."""
    return (code * 0x9E37_79B9_7F4A_7C15 + 1) & ((1 << 64) - 1)


#: Entry codes: plain integers draw much faster than composite strategies.
code_st = st.integers(0, (1 << 55) - 1)
entry = code_st.map(entry_of)
u64_st = st.integers(0, (1 << 64) - 1)


@st.composite
def hand_outs(draw: st.DrawFn, first: int, end: int) -> tuple[str, int, list[int], list[int]]:
    """A fault reply inside [first, end): sometimes every entry VALID (hand_out's fast path)."""
    a = draw(st.integers(first, end - 1))
    n = draw(st.integers(1, end - a))
    if draw(st.booleans()):
        ent = [HMM_PFN_VALID | x for x in draw(st.lists(st.integers(0, 7), min_size=n, max_size=n))]
    else:
        ent = draw(st.lists(entry, min_size=n, max_size=n))
    raws = draw(st.lists(u64_st, min_size=n, max_size=n))
    return ("hand", a, ent, raws)


#: A zap range in pages: any order (so empty and reversed ranges come up), within the slack.
page_st = st.integers(-SLACK, PAGES + SLACK)
zaps = st.tuples(st.just("zap"), page_st, page_st)
#: One span's [first, end) pages.
bounds_st = st.integers(0, PAGES - 1).flatmap(
    lambda a: st.tuples(st.just(a), st.integers(a + 1, PAGES))
)
#: A range that is not empty.
nonempty = st.tuples(page_st, page_st).filter(lambda r: r[0] != r[1]).map(sorted).map(tuple)


@st.composite
def layouts(draw: st.DrawFn, max_spans: int = 4) -> list[tuple[int, int]]:
    """1..max_spans sorted, disjoint, non-empty spans in [0, PAGES); neighbours may touch."""
    cuts = sorted(draw(st.sets(st.integers(0, PAGES), min_size=2, max_size=2 * max_spans)))
    spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=False)]
    if len(spans) > 1 and draw(st.booleans()):
        spans[1] = (spans[0][1], spans[1][1])  # adjacent spans: the boundary page matters
    return spans


def fill(span: Span, model: Shadow, data: st.DataObject) -> None:
    """Hand out the whole span once, so most pages are held before the zaps."""
    n = model.end - model.first
    codes = data.draw(st.lists(code_st, min_size=n, max_size=n), label="fill")
    ent, raws = [entry_of(c) for c in codes], [raw_of(c) for c in codes]
    span.hand_out(addr(model.first), np.array(ent, dtype=np.uint64), np.array(raws, np.uint64))
    model.hand_out(model.first, ent, raws)


def snapshot(spans: list[Span]) -> list[tuple[bytes, bytes, int]]:
    """Every span's arrays and counter, for a bit-for-bit comparison."""
    return [(s.handed.tobytes(), s.raw.tobytes(), s.held) for s in spans]


# --- Span ------------------------------------------------------------------------------------


def test_a_later_read_only_hand_out_of_the_same_frame_keeps_the_write_bit_in_the_model() -> None:
    """The case hypothesis drew in CI (2026-12-06): WRITE for frame 7 at page 52, then a
    read-only entry for frame 7 there. The span keeps WRITE (b302dc2); the model had not."""
    span, model = Span(addr(0), addr(55)), Shadow(0, 55)
    for page, ent in ((52, [entry_of(31), 0, 0]), (51, [HMM_PFN_VALID, HMM_PFN_VALID | 7])):
        raws = [raw_of(i + 1) for i in range(len(ent))]
        span.hand_out(addr(page), np.array(ent, dtype=np.uint64), np.array(raws, np.uint64))
        model.hand_out(page, ent, raws)
        model.check(span)
    assert model.held[52][0] == HMM_PFN_VALID | HMM_PFN_WRITE | 7


@fast
@given(bounds_st, st.data())
def test_span_follows_the_model_through_hand_outs_and_zaps(
    bounds: tuple[int, int], data: st.DataObject
) -> None:
    first, end = bounds
    span, model = Span(addr(first), addr(end)), Shadow(first, end)
    model.check(span)
    ops = data.draw(st.lists(st.one_of(hand_outs(first, end), zaps), max_size=12), label="ops")
    for op in ops:
        if op[0] == "hand":
            _, page, ent, raws = op
            span.hand_out(addr(page), np.array(ent, dtype=np.uint64), np.array(raws, np.uint64))
            model.hand_out(page, ent, raws)
        else:
            _, lo, hi = op
            before = span.held
            span.zap(addr(lo), addr(hi))
            cleared = model.zap(lo, hi)
            assert before - span.held == cleared, "held fell by other than the pages cleared"
        model.check(span)


@fast
@given(bounds_st, page_st, page_st, st.data())
def test_span_zap_clears_exactly_the_range(
    bounds: tuple[int, int], lo: int, hi: int, data: st.DataObject
) -> None:
    first, end = bounds
    span, model = Span(addr(first), addr(end)), Shadow(first, end)
    fill(span, model, data)
    handed, raw, held = span.handed.copy(), span.raw.copy(), span.held
    span.zap(addr(lo), addr(hi))
    pages = np.arange(first, end)
    inside = (pages >= lo) & (pages < hi)
    assert (span.handed[inside] == 0).all() and (span.raw[inside] == 0).all()
    assert np.array_equal(span.handed[~inside], handed[~inside]), "a page outside was touched"
    assert np.array_equal(span.raw[~inside], raw[~inside]), "a raw entry outside was touched"
    assert held - span.held == int(np.count_nonzero(handed[inside]))
    if lo >= hi or hi <= first or lo >= end:  # empty, reversed or outside: nothing changes
        assert span.held == held and np.array_equal(span.handed, handed)


@fast
@given(bounds_st, nonempty, st.data())
def test_span_zap_of_a_range_equals_the_zaps_of_its_halves_and_is_idempotent(
    bounds: tuple[int, int], rng: tuple[int, int], data: st.DataObject
) -> None:
    first, end = bounds
    lo, hi = rng
    mid = data.draw(st.integers(lo, hi), label="mid")
    whole, halves = Span(addr(first), addr(end)), Span(addr(first), addr(end))
    model = Shadow(first, end)
    fill(whole, model, data)
    halves.hand_out(whole.start, whole.handed.copy(), whole.raw.copy())
    whole.zap(addr(lo), addr(hi))
    halves.zap(addr(lo), addr(mid))
    halves.zap(addr(mid), addr(hi))
    assert snapshot([whole]) == snapshot([halves])
    again = snapshot([whole])
    whole.zap(addr(lo), addr(hi))
    assert snapshot([whole]) == again


@fast
@given(bounds_st, nonempty)
def test_span_overlaps_and_contains(bounds: tuple[int, int], rng: tuple[int, int]) -> None:
    first, end = bounds
    lo, hi = rng
    span = Span(addr(first), addr(end))
    shared = set(range(first, end)) & set(range(lo, hi))
    assert span.overlaps(addr(lo), addr(hi)) == bool(shared)
    assert span.contains(addr(lo), addr(hi)) == (first <= lo and hi <= end)


# --- Mirror ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mm() -> Iterator[Mm]:
    """A real ``Mm`` of this very process (the mirrors below never read it)."""
    pid = os.getpid()
    view = ProcessView(pid)
    try:
        yield Mm(pid=pid, start_time=start_time(pid), view=view, pidfd=-1)
    finally:
        view.close()


def mirror_of(mm: Mm, mirror_id: int, layout: list[tuple[int, int]]) -> Mirror:
    """A mirror of ``mm`` over ``layout``'s spans, owned by its own session."""
    name = f"agent-{mirror_id}"
    session = Session(id=mirror_id, identity=name.encode(), name=name, last_seen=0.0)
    spans = [Span(addr(a), addr(b)) for a, b in layout]
    return Mirror(
        id=mirror_id, session=session, mm=mm, spans=spans, access=Access.READ | Access.WRITE
    )


@fast
@given(layouts(), page_st, page_st, st.data())
def test_mirror_zap_clears_the_range_in_every_span(
    mm: Mm, layout: list[tuple[int, int]], lo: int, hi: int, data: st.DataObject
) -> None:
    mirror = mirror_of(mm, 1, layout)
    models = [Shadow(a, b) for a, b in layout]
    for span, model in zip(mirror.spans, models, strict=True):
        fill(span, model, data)
    before = sum(s.held for s in mirror.spans)
    mirror.zap(addr(lo), addr(hi))
    cleared = sum(model.zap(lo, hi) for model in models)
    for span, model in zip(mirror.spans, models, strict=True):
        model.check(span)
    assert before - sum(s.held for s in mirror.spans) == cleared


@fast
@given(st.lists(layouts(max_spans=3), min_size=1, max_size=4), nonempty, st.data())
def test_zapping_every_mirror_leaves_the_non_overlapping_ones_untouched(
    mm: Mm, layouts_: list[list[tuple[int, int]]], rng: tuple[int, int], data: st.DataObject
) -> None:
    """Several agents mirror one mm: a zap reaches into exactly the overlapping mirrors, so the
    fan-out may skip a mirror for which ``overlaps`` is false."""
    lo, hi = rng
    mirrors = [mirror_of(mm, i + 1, layout) for i, layout in enumerate(layouts_)]
    models = [[Shadow(a, b) for a, b in layout] for layout in layouts_]
    for mirror, shadows in zip(mirrors, models, strict=True):
        for span, model in zip(mirror.spans, shadows, strict=True):
            fill(span, model, data)
    before = [snapshot(m.spans) for m in mirrors]
    for mirror, shadows, snap, layout in zip(mirrors, models, before, layouts_, strict=True):
        in_range = any(a < hi and lo < b for a, b in layout)
        assert mirror.overlaps(addr(lo), addr(hi)) == in_range
        mirror.zap(addr(lo), addr(hi))
        for span, model in zip(mirror.spans, shadows, strict=True):
            model.zap(lo, hi)
            model.check(span)
        if not in_range:
            assert snapshot(mirror.spans) == snap, "a mirror outside the range was changed"


@fast
@given(layouts(), nonempty)
def test_mirror_span_for_finds_the_one_containing_span(
    mm: Mm, layout: list[tuple[int, int]], rng: tuple[int, int]
) -> None:
    lo, hi = rng
    mirror = mirror_of(mm, 1, layout)
    assert (mirror.lo, mirror.hi) == (addr(layout[0][0]), addr(layout[-1][1]))
    want = [s for s, (a, b) in zip(mirror.spans, layout, strict=True) if a <= lo and hi <= b]
    assert mirror.span_for(addr(lo), addr(hi)) is (want[0] if want else None)


def test_zap_of_an_untouched_span_and_of_empty_ranges_changes_nothing() -> None:
    """The edges, spelled out: nothing held; empty, reversed and outside ranges; the last page."""
    span = Span(addr(4), addr(8))
    span.zap(addr(0), addr(100))  # nothing held yet
    assert span.held == 0 and not span.handed.any()
    valid = np.full(4, HMM_PFN_VALID | 7, dtype=np.uint64)
    span.hand_out(addr(4), valid, np.arange(1, 5, dtype=np.uint64))
    for lo, hi in [(5, 5), (7, 5), (0, 4), (8, 12), (-3, -1)]:
        span.zap(addr(lo), addr(hi))
        assert span.held == 4 and (span.handed == valid).all(), (lo, hi)
    span.zap(addr(7), addr(9))  # over the end: only page 7
    assert span.held == 3 and [int(x) for x in span.raw] == [1, 2, 3, 0]
    span.zap(addr(3), addr(5))  # over the start: only page 4
    assert span.held == 2 and [int(x) for x in span.raw] == [0, 2, 3, 0]
