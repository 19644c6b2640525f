"""The proc watcher: diff maps and pagemap against what each mirror was handed.

Only pages some mirror holds a VALID translation for are read, each once however
many mirrors hold it, so the cost follows the mirrored working set, not the
process size or the number of agents. A maps diff alone
misses MAP_FIXED over a whole VMA and MADV_DONTNEED; the pagemap PFN and
present-bit comparison catches both. Changes are seen up to one poll interval
after they happen: this is observation mode, and the docs say so.

``ProcWatch`` is the poll loop, adaptive and bounded by its own cost. What it
finds goes to an ``FanOut`` (the fan-out); what it cannot handle itself (the
mm gone, new VMAs to register with a uffd, its own failure) to a ``Keeper``
(``watch.supervisor``). Both are declared here, so this module imports neither.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np
from hmmirror.daemon.linux.procfs import PAGE_SHIFT, Vmas
from hmmirror.daemon.pagetable import classify, runs, vma_perms
from hmmirror.daemon.state import Mm, Span
from hmmirror.proto.messages import Event

log = logging.getLogger(__name__)

Change = tuple[int, int, Event]


class FanOut(Protocol):
    """Where watchers report changes: the fan-out (``invalidation.Invalidator``)."""

    def announce(
        self, mm: Mm, changes: list[Change], then: Callable[[], None] | None = None
    ) -> None:
        """Begin an invalidation per event among ``changes`` now; ``then`` once all completed."""


class Keeper(Protocol):
    """What the proc watcher hands up about its mm (``watch.supervisor.Supervisor``)."""

    def cover(self, mm: Mm) -> None:
        """Register the VMAs under ``mm``'s mirrors with its userfaultfds."""

    def exited(self, mm: Mm) -> None:
        """``mm`` is gone (exit or execve): RELEASE it, once."""

    def failed(self, mm: Mm) -> None:
        """The watcher of ``mm`` failed: EVICT the mirrors it can no longer protect."""


def detect(
    mm: Mm, zero_pfn: int, lo: int = 0, hi: int = 1 << 64, vmas: Vmas | None = None
) -> list[Change]:
    """Return the changed ranges of ``mm`` within [lo, hi) that make handed-out entries stale.

    pagemap is read before the VMAs: a munmap landing between the two reads then
    shows as a missing VMA (UNMAP), not as a page gone from a live VMA (CLEAR).
    """
    wanted: list[tuple[Span, int, int, int]] = []
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
            wanted.append((span, first, last, span.start + (first << PAGE_SHIFT)))
    if not wanted:
        return []
    # Each page is read once, however many mirrors hold it (an mm's mirrors, one per agent,
    # often cover one range): the union of their ranges, every pagemap before any VMA.
    ranges = union((s, s + ((last - first) << PAGE_SHIFT)) for _, first, last, s in wanted)
    raws = [mm.view.pagemap(s, (e - s) >> PAGE_SHIFT) for s, e in ranges]
    # Only the VMAs of each read range: a full maps parse costs ~1 ms per 1,000 VMAs.
    perms = [
        vma_perms(vmas if vmas is not None else mm.view.maps_range(s, e), s, (e - s) >> PAGE_SHIFT)
        for s, e in ranges
    ]
    starts = [s for s, _ in ranges]
    found: list[Change] = []
    for span, first, last, sub_start in wanted:
        i = bisect.bisect_right(starts, sub_start) - 1  # the union range holding this one
        a = (sub_start - starts[i]) >> PAGE_SHIFT
        cut = slice(a, a + last - first)
        handed, raw = span.handed[first:last], span.raw[first:last]
        events = classify(handed, raw, raws[i][cut], perms[i].part(cut), zero_pfn)
        found.extend(runs(events, sub_start))
    return merge(found)


def union(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The same addresses as ``ranges``, as sorted disjoint ranges (empty ones dropped).

    An mm's mirrors often cover one range, one mirror per agent: reading or walking
    the union reads each page, or walks each VMA, once. Touching ranges merge too,
    which changes nothing: a VMA meets the merged range exactly when it meets one
    of the two.
    """
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(r for r in ranges if r[0] < r[1]):
        if out and lo <= out[-1][1]:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def merge(changes: list[Change]) -> list[Change]:
    """Merge overlapping or touching ranges with the same event (two mirrors saw one change),
    in order of event, then address."""
    by_event: dict[Event, list[tuple[int, int]]] = {}
    for start, end, event in changes:
        by_event.setdefault(event, []).append((start, end))
    return [(lo, hi, event) for event in sorted(by_event) for lo, hi in union(by_event[event])]


class ProcWatch:
    """The proc watcher's poll loop over one mm: fast after a change, backing off while
    quiet, never spending more than 5% of a core."""

    def __init__(
        self,
        mm: Mm,
        zero_pfn: int,
        bounds: tuple[float, float],
        announcer: FanOut,
        keeper: Keeper,
    ) -> None:
        self.mm = mm
        self.zero_pfn = zero_pfn
        self.bounds = bounds
        self.announcer = announcer
        self.keeper = keeper

    async def run(self) -> None:
        """Poll until the mm is released; if polling fails, EVICT its mirrors."""
        try:
            await self._poll()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("watcher of pid %d failed; evicting its mirrors", self.mm.pid)
            self.keeper.failed(self.mm)

    async def _poll(self) -> None:
        """The loop itself."""
        mm = self.mm
        lo, hi = self.bounds
        interval = lo
        mm.lag["maps"] = interval
        while not mm.released:
            await asyncio.sleep(interval)
            t0 = time.perf_counter()
            try:
                changes = detect(mm, self.zero_pfn)
            except ProcessLookupError:
                # Death is the pidfd's to report; an execve leaves no pidfd event behind.
                if mm.view.replaced():
                    self.keeper.exited(mm)
                return
            if changes:
                self.announcer.announce(mm, changes)
            self.keeper.cover(mm)  # new VMAs under a mirror raise no event: register them
            if mm.view.replaced():
                self.keeper.exited(mm)  # execve (or death): the mm we watch is gone, RELEASE it
                return
            cost = time.perf_counter() - t0
            # Poll fast after a change, back off while quiet, never spend >5% of a core.
            interval = lo if changes else min(hi, interval * 1.5)
            interval = max(interval, cost * 20)
            mm.lag["maps"] = interval + cost
