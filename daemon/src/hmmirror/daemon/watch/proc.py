"""The proc watcher: diff maps and pagemap against what each mirror was handed.

Only pages some mirror holds a VALID translation for are read, so the cost
follows the mirrored working set, not the process size. A maps diff alone
misses MAP_FIXED over a whole VMA and MADV_DONTNEED; the pagemap PFN and
present-bit comparison catches both. Changes are seen up to one poll interval
after they happen: this is observation mode, and the docs say so.
"""

from __future__ import annotations

import numpy as np
from hmmirror.daemon.linux.procfs import PAGE_SHIFT, Vmas
from hmmirror.daemon.pagetable import classify, runs, vma_perms
from hmmirror.daemon.state import Mm
from hmmirror.proto.messages import Event

Change = tuple[int, int, Event]


def detect(
    mm: Mm, zero_pfn: int, lo: int = 0, hi: int = 1 << 64, vmas: Vmas | None = None
) -> list[Change]:
    """Return the changed ranges of ``mm`` within [lo, hi) that make handed-out entries stale.

    pagemap is read before the VMAs: a munmap landing between the two reads then
    shows as a missing VMA (UNMAP), not as a page gone from a live VMA (CLEAR).
    """
    reads = []
    for mirror in mm.mirrors:
        for span in mirror.spans:
            a, b = max(lo, span.start), min(hi, span.end)
            if a >= b or span.held == 0:
                continue
            ia, ib = (a - span.start) >> PAGE_SHIFT, (b - span.start) >> PAGE_SHIFT
            held = np.flatnonzero(span.handed[ia:ib])
            if len(held) == 0:
                continue
            first, last = ia + int(held[0]), ia + int(held[-1]) + 1
            sub_start = span.start + (first << PAGE_SHIFT)
            reads.append((span, first, last, sub_start, mm.view.pagemap(sub_start, last - first)))
    if not reads:
        return []
    found: list[Change] = []
    for span, first, last, sub_start, new_raw in reads:
        sub_end = sub_start + ((last - first) << PAGE_SHIFT)
        # Only the VMAs of each read range: a full maps parse costs ~1 ms per 1,000 VMAs.
        here = vmas if vmas is not None else mm.view.maps_range(sub_start, sub_end)
        perms = vma_perms(here, sub_start, last - first)
        events = classify(span.handed[first:last], span.raw[first:last], new_raw, perms, zero_pfn)
        found.extend(runs(events, sub_start))
    return merge(found)


def merge(changes: list[Change]) -> list[Change]:
    """Merge overlapping or touching ranges with the same event (two mirrors saw one change)."""
    out: list[Change] = []
    for start, end, event in sorted(changes, key=lambda c: (c[2], c[0])):
        if out and out[-1][2] == event and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(end, out[-1][1]), event)
        else:
            out.append((start, end, event))
    return out
