"""A mirror's device page table, and what the session's drain loop does to it.

One ``hmm_pfn`` u64 per page of the mirrored interval. INVALIDATE items zap
entries here synchronously, inside the drain loop, bumping the generation that
the fault loop's ``read_retry`` compares (``Mirror`` in ``mirror.py``, which
adds the device operations); each zap returns the in-flight DMAs that overlap
it, which the session's ACK must wait for. ``_held`` counts the VALID entries,
so that zapping an empty table costs nothing.
"""

from __future__ import annotations

import asyncio
import errno
import operator
import types
from collections.abc import Callable, Mapping

import numpy as np
from hmmirror.client.errors import DeviceError, MirrorEvicted
from hmmirror.proto.entries import HMM_PFN_VALID, HMM_PFN_WRITE, PAGE_SHIFT, PAGE_SIZE, Entries
from hmmirror.proto.messages import Access, Event

VALID = np.uint64(HMM_PFN_VALID)
_NOT_WRITE = ~np.uint64(HMM_PFN_WRITE)
#: How many invalidations a mirror remembers in ``events`` (for tests and diagnostics).
MAX_EVENTS_KEPT = 4096
#: Events that end the whole mirror: they always take the careful path.
_WHOLE_MIRROR = frozenset((int(Event.RELEASE), int(Event.EVICT)))
_EVENT_FIELD = operator.itemgetter(3)
#: Event by wire value, without an Enum call per item.
_EVENT_OF = tuple(Event)
COUNTER_NAMES = (
    "page_faults",
    "page_faults_handled",
    "page_invalidations",
    "page_invalidations_handled",
)
#: ``rdma stat mr``'s counters, in its order; mirrors keep the first four.
MR_COUNTER_NAMES = (*COUNTER_NAMES, "page_prefetch")


class MirrorTable:
    """The page table of mirror ``id``: [start, start + length) of process ``pid``."""

    def __init__(self, mirror_id: int, pid: int, start: int, length: int, access: Access) -> None:
        self.id = mirror_id
        self.pid = pid
        self.start = start
        self.end = start + length
        self.npages = length >> PAGE_SHIFT
        self.access = access
        #: The device page table: one hmm_pfn u64 per page. Read it; change it only
        #: through the mirror's methods, which keep ``_held`` exact.
        self.table: Entries = np.zeros(self.npages, dtype=np.uint64)
        #: How many entries of ``table`` are VALID: zapping an empty table costs nothing.
        self._held = 0
        self.seq = 0
        self._gen = 0
        self._counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.counters: Mapping[str, int] = types.MappingProxyType(self._counters)
        #: True once the target exited (RELEASE).
        self.released = False
        self.dropped: str | None = None
        self._evicted = False
        self._inflight: list[tuple[int, int, asyncio.Future[None]]] = []
        self._events: list[tuple[int, int, int, int]] = []
        #: Called when an invalidation zapped this mirror's last VALID entry.
        self.on_empty: Callable[[MirrorTable], None] | None = None

    # --- called by the session's drain loop (the invalidate callback) ---------------------------

    def _invalidate(
        self, seq: int, start: int, end: int, event: Event
    ) -> list[asyncio.Future[None]]:
        """mmu_interval_set_seq, zap, and return the in-flight DMAs the ACK must wait for."""
        self.seq = seq
        self._gen += 1
        if len(self._events) < MAX_EVENTS_KEPT:
            self._events.append((seq, start, end, int(event)))
        lo, hi = max(start, self.start), min(end, self.end)
        if self._held and lo < hi:
            a, b = (lo - self.start) >> PAGE_SHIFT, (hi - self.start) >> PAGE_SHIFT
            zapped = int(np.count_nonzero(self.table[a:b] >= VALID))
            if zapped:
                self.table[a:b] = 0
                self._held -= zapped
                self._counters["page_invalidations"] += zapped
                self._counters["page_invalidations_handled"] += 1
                if self._held == 0 and self.on_empty is not None:
                    self.on_empty(self)
        if event == Event.RELEASE and not self.released:  # once, however many items say so
            self.released = True
            self.table[:] = 0
            self._held = 0
        elif event == Event.EVICT:  # hmmd removed the mirror (its watcher could not go on)
            self._drop("evicted by hmmd", evicted=True)
        return [f for s, e, f in self._inflight if s < end and start < e and not f.done()]

    def _invalidate_items(
        self, items: tuple[tuple[int, int, int, int], ...]
    ) -> list[asyncio.Future[None]]:
        """Apply one INVALIDATE's items ``[seq, start, end, event]``; return the DMAs to wait for.

        The common case, a table with nothing to zap and no DMA in flight, costs
        one pass over the items whatever their number.
        """
        if self._held or self._inflight or not _WHOLE_MIRROR.isdisjoint(map(_EVENT_FIELD, items)):
            # Each DMA once, however many items overlap it: 4096 items over the same
            # in-flight DMAs made a list of 4096 entries per DMA, kept until they completed.
            fences: dict[asyncio.Future[None], None] = {}
            for seq, start, end, event in items:
                kind = _EVENT_OF[event] if event < len(_EVENT_OF) else Event.CLEAR
                fences.update(dict.fromkeys(self._invalidate(seq, start, end, kind)))
            return list(fences)
        if items:
            self.seq = items[-1][0]
        self._gen += 1
        room = MAX_EVENTS_KEPT - len(self._events)
        if room > 0:
            self._events.extend(items[:room])
        return []

    @property
    def held(self) -> int:
        """How many entries are VALID now."""
        return self._held

    @property
    def events(self) -> list[tuple[int, int, Event]]:
        """The first invalidations this mirror received: (start, end, event)."""
        return [
            (start, end, _EVENT_OF[ev] if ev < len(_EVENT_OF) else Event.CLEAR)
            for _, start, end, ev in self._events
        ]

    def _drop(self, reason: str, evicted: bool = False) -> None:
        """The mirror is gone (session lost, evicted, closed): no translation survives."""
        self.table[:] = 0
        self._held = 0
        self._gen += 1
        self.dropped = reason
        self._evicted = self._evicted or evicted

    # --- checks and table slots -------------------------------------------------------------

    def _check_live(self) -> None:
        """Raise if the mirror is unusable: its target exited, or it was evicted or dropped."""
        if self.released:
            raise DeviceError(errno.ESRCH, f"process {self.pid} of mirror {self.id} exited")
        if self._evicted:
            raise MirrorEvicted(f"mirror {self.id}: {self.dropped}")
        if self.dropped is not None:
            raise DeviceError(errno.ENODEV, f"mirror {self.id}: {self.dropped}")

    def _range(self, addr: int, npages: int) -> tuple[int, int]:
        """Check [addr, +npages) is page-aligned and inside the mirror; return its table slice."""
        if addr % PAGE_SIZE or npages <= 0:
            raise DeviceError(errno.EINVAL, f"bad range {addr:#x} + {npages} pages")
        end = addr + (npages << PAGE_SHIFT)
        if addr < self.start or end > self.end:
            raise DeviceError(
                errno.EINVAL,
                f"[{addr:#x}, {end:#x}) is outside mirror [{self.start:#x}, {self.end:#x})",
            )
        return (addr - self.start) >> PAGE_SHIFT, ((addr - self.start) >> PAGE_SHIFT) + npages

    def _zap_slots(self, addr: int, npages: int) -> None:
        """Drop this mirror's own entries for [addr, +npages) (no INVALIDATE involved)."""
        a = (addr - self.start) >> PAGE_SHIFT
        dst = self.table[a : a + npages]
        zapped = int(np.count_nonzero(dst >= VALID)) if self._held else 0
        if zapped:
            dst[:] = 0
            self._held -= zapped

    def _install(self, a: int, entries: Entries, downgrade: bool) -> int:
        """Install ``entries`` at table slot ``a`` (others there dropped); return how many."""
        if downgrade:
            entries &= _NOT_WRITE
        n = len(entries)
        dst = self.table[a : a + n]
        before = int(np.count_nonzero(dst >= VALID)) if self._held else 0
        if entries.min() >= VALID:  # every entry VALID: the usual populate result
            dst[:] = entries
            self._held += n - before
            return n
        valid = entries >= VALID
        # Not VALID now means not held: hmmd's record of this mirror says so too (it
        # keeps only VALID entries), so an older entry kept here would never be invalidated.
        dst[:] = np.where(valid, entries, np.uint64(0))
        self._held += int(np.count_nonzero(valid)) - before
        return int(np.count_nonzero(valid))

    def _first_missing(self, a: int, b: int, need: np.uint64) -> int | None:
        """Offset from ``a`` of the first entry in [a, b) lacking ``need``, or None."""
        bad = np.flatnonzero((self.table[a:b] & need) != need)
        return int(bad[0]) if len(bad) else None

    def _forget(self, a: int, b: int, out_of_time: bool, what: str, why: Exception) -> None:
        """hmmd judged the translations of table slots [a, b) stale: drop them, so the
        retry re-faults instead of presenting them again (SPEC: zap the named entries);
        EBUSY once the retry budget is spent."""
        zapped = int(np.count_nonzero(self.table[a:b] >= VALID))
        self.table[a:b] = 0
        self._held -= zapped
        if out_of_time:
            raise DeviceError(errno.EBUSY, f"{what} kept going stale: {why}") from why
