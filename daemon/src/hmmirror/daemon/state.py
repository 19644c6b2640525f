"""hmmd's state: agent sessions, the watched mms with their sequence numbers, and the
mirrors that tie them together.

A ``Session`` is one agent connection, from HELLO to GOODBYE, lease expiry or
eviction; its INVALIDATE numbering and ack accounting are the fan-out's
(``outbox.Outbox``, ``invalidation``). An ``Mm`` is the userspace twin of ``struct
mmu_notifier_subscriptions``: it keeps ``seq`` (even when idle, odd while any
invalidation is active) and ``active`` (how many are). Each ``Mirror`` keeps,
per interval, a *shadow*: the entries the daemon handed to the agent and the
raw pagemap entries they came from. The shadow is what the watcher compares
the live page table against, so a change is detected for exactly the
translations a device may hold. A userfaultfd watcher sits above this module
and works on the ``Mm`` it watches; the ``Mm`` keeps it as a ``UffdWatcher``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from hmmirror.daemon.linux.creds import Creds
from hmmirror.daemon.linux.procfs import PAGE_SHIFT, ProcessView, Raw
from hmmirror.proto.entries import HMM_PFN_PFN_MASK, HMM_PFN_WRITE, Entries
from hmmirror.proto.messages import Access, Event
from hmmirror.transport.peer import Peer

_VALID = np.uint64(1 << 63)
_WRITE = np.uint64(HMM_PFN_WRITE)
_PFN = np.uint64(HMM_PFN_PFN_MASK)


@dataclass(eq=False)
class Session:
    """One agent connection, from HELLO to GOODBYE, lease expiry or eviction."""

    id: int
    identity: bytes
    name: str
    last_seen: float
    peer: Peer = field(default_factory=Peer)
    """Who the agent is, as the transport proved it (policy, logs)."""
    credentials: Creds | None = None
    """The agent process's own credentials, read at HELLO (``ipc://`` only; None when they
    could not be proven): the kernel's ptrace rule compares them with a target's."""
    physical_frames: bool = False
    """Entries carry real PFNs (a root agent over ipc, or a ``frames = "physical"`` grant);
    otherwise opaque frame tokens."""
    inspector: bool = False
    """May see every session's mirrors in ``inventory`` and the full ``status``."""
    version: tuple[int, int] = (1, 0)
    """The protocol version its ``hello`` said (1.1 and above may attach a DMA window)."""
    mirrors: dict[int, Mirror] = field(default_factory=dict)
    fenced: bool = False
    next_id: int = 1

    def take_id(self) -> int:
        """A fresh header id for a daemon-originated message."""
        self.next_id += 1
        return self.next_id


class UffdWatcher(Protocol):
    """What an ``Mm`` keeps of a userfaultfd watcher (``watch.uffd.UffdWatch``, which sits
    above this module and works on the ``Mm`` it watches)."""

    mm: Mm
    fd: int
    closed: bool
    events: dict[str, int]
    written_runs: int

    def close(self) -> None:
        """Stop watching and close the userfaultfd."""

    def cover(self) -> int:
        """Register the VMAs under the mm's mirrors; how many are registered."""
        ...

    def cover_range(self, start: int, end: int) -> int:
        """Register the VMAs over [start, end); how many are registered."""
        ...

    def release(self, lo: int, hi: int) -> None:
        """Unregister [lo, hi) (another watcher takes it)."""

    def protect(self, start: int, end: int) -> None:
        """Write-protect [start, end)."""

    def unprotect(self, start: int, end: int, wake: bool = True) -> None:
        """Lift write protection from [start, end)."""

    def scan_written(self) -> list[tuple[int, int, Event]]:
        """The runs written since the last scan, as WRITTEN changes."""
        ...

    def track_writes(self) -> None:
        """Arm written-page tracking for the subscribed mirrors; start the scan loop."""


def _own(array: Entries | Raw, n: int) -> bool:
    """Whether ``array`` is ``n`` u64s of its own memory, that a span may keep."""
    return (
        len(array) == n
        and array.dtype == np.uint64
        and array.flags.owndata
        and array.flags.writeable
        and array.flags.c_contiguous
    )


def _keep_write(handed: Entries, entries: Entries) -> None:
    """Give ``entries`` the WRITE bit where ``handed`` holds a WRITE entry for the same frame."""
    kept = (handed & _WRITE) != 0
    if not kept.any():
        return
    kept &= ((handed ^ entries) & _PFN) == 0
    kept &= entries >= _VALID
    entries[kept] |= _WRITE


@dataclass
class Span:
    """One mirrored interval [start, end) and its shadow arrays (one u64 per page)."""

    start: int
    end: int
    handed: Entries = field(init=False)
    raw: Raw = field(init=False)
    held: int = field(init=False, default=0)
    """How many handed-out entries are VALID: lets a zap of an empty shadow cost nothing."""

    def __post_init__(self) -> None:
        npages = (self.end - self.start) >> PAGE_SHIFT
        self.handed = np.zeros(npages, dtype=np.uint64)
        self.raw = np.zeros(npages, dtype=np.uint64)

    def hand_out(self, start: int, entries: Entries, raw: Raw) -> None:
        """Record that the agent was given ``entries`` (VALID ones only) from ``start``.

        Both arrays are given up by the caller, who sends a copy of the entries
        (``fault.service.Walked``): a hand-out of the whole span keeps them as the
        shadow, their pages that are not VALID zeroed, rather than copy them.

        The shadow is everything the agent may hold, which is not always the last
        hand-out: replies may reach the agent in another order than their hand-outs
        (a fault that reads its pages in the same trip is answered once its copy is
        done, a later fault at once). So a WRITE entry recorded earlier for the same
        frame stays recorded; an earlier entry whose page changed since was
        invalidated before this hand-out (``fault.handlers``), and is no longer here.
        """
        a = (start - self.start) >> PAGE_SHIFT
        n = len(entries)
        b = a + n
        if self.held:
            _keep_write(self.handed[a:b], entries)
            self.held -= int(np.count_nonzero(self.handed[a:b]))
        all_valid = bool(entries.min() >= _VALID)  # the usual populate result
        if a == 0 and n == len(self.handed) and _own(entries, n) and _own(raw, n):
            if not all_valid:
                invalid = entries < _VALID
                entries[invalid] = 0
                raw[invalid] = 0
            # Arrays just made, not the span's old ones: no page of them to fault in afresh.
            self.handed, self.raw = entries, raw
        elif all_valid:
            self.handed[a:b] = entries
            self.raw[a:b] = raw
        else:
            valid = entries >= _VALID
            self.handed[a:b] = np.where(valid, entries, np.uint64(0))
            self.raw[a:b] = np.where(valid, raw, np.uint64(0))
        self.held += n if all_valid else int(np.count_nonzero(self.handed[a:b]))

    def contains(self, start: int, end: int) -> bool:
        """Whether [start, end) lies inside this span."""
        return self.start <= start and end <= self.end

    def overlaps(self, start: int, end: int) -> bool:
        """Whether [start, end) intersects this span."""
        return start < self.end and self.start < end

    def zap(self, start: int, end: int) -> None:
        """Forget what was handed out in [start, end) (the agent will zap it too)."""
        if self.held == 0:
            return
        lo = max(start, self.start)
        hi = min(end, self.end)
        if lo < hi:
            a, b = (lo - self.start) >> PAGE_SHIFT, (hi - self.start) >> PAGE_SHIFT
            zapped = int(np.count_nonzero(self.handed[a:b]))
            if zapped:
                self.handed[a:b] = 0
                self.raw[a:b] = 0
                self.held -= zapped


@dataclass(eq=False)
class Mirror:
    """One agent's subscription to intervals of one mm (an ``mmu_interval_notifier``)."""

    id: int
    session: Session
    mm: Mm
    spans: list[Span]
    access: Access
    dead: bool = False
    watch_writes: bool = False
    """Subscribed to WRITTEN invalidations (written-page tracking)."""
    strict: bool = False
    """Strict writes: a write to a page it holds waits for the WRITTEN acks (implies
    ``watch_writes``)."""
    lo: int = field(init=False)
    """Lowest mirrored address."""
    hi: int = field(init=False)
    """End of the highest mirrored span."""
    pages: int = field(init=False)
    """Pages of address space its spans cover (what the peer's budget counts)."""

    def __post_init__(self) -> None:
        self.lo = min(s.start for s in self.spans)
        self.hi = max(s.end for s in self.spans)
        self.pages = sum(s.end - s.start for s in self.spans) >> PAGE_SHIFT

    def span_for(self, start: int, end: int) -> Span | None:
        """The span containing [start, end), if one does."""
        for span in self.spans:
            if span.contains(start, end):
                return span
        return None

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any span intersects [start, end)."""
        if start >= self.hi or end <= self.lo:
            return False
        return len(self.spans) == 1 or any(s.overlaps(start, end) for s in self.spans)

    def zap(self, start: int, end: int) -> None:
        """Forget handed-out entries in [start, end) across every span."""
        for span in self.spans:
            span.zap(start, end)


@dataclass(eq=False)
class Mm:
    """A watched process, identified by pid plus start time."""

    pid: int
    start_time: int
    view: ProcessView
    pidfd: int
    seq: int = 2
    active: int = 0
    mirrors: list[Mirror] = field(default_factory=list)
    active_ranges: list[tuple[int, int]] = field(default_factory=list)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    released: bool = False
    closed: bool = False
    watcher: asyncio.Task[None] | None = None
    uffd: UffdWatcher | None = None
    """The target's userfaultfd watcher, when hmmd has one (see ``watch.uffd``)."""
    strict_uffd: UffdWatcher | None = None
    """The strict-write watch (a second uffd without WP_ASYNC), when a mirror needs one."""
    written: asyncio.Task[None] | None = None
    """The written-page scan loop, while a mirror subscribes to writes."""
    lag: dict[str, float] = field(default_factory=dict)
    """Per poll loop (``maps``, ``written``): the longest a change it alone sees can now go
    unseen, in seconds (its next sleep plus its last cost). ``status`` reports the largest
    as ``watch_lag_s``, so that a quiescence wait knows how long to look (docs/ARCHITECTURE.md
    §A.4: mprotect and page writes raise no event)."""

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def key(self) -> tuple[int, int]:
        """The identity under which mirrors find this mm."""
        return (self.pid, self.start_time)

    def invalidate_start(self, ranges: list[tuple[int, int]]) -> int:
        """Open an invalidation window: ``seq`` goes odd (``mn_itree_inv_start_range``)."""
        self.active += 1
        self.seq |= 1
        self.active_ranges.extend(ranges)
        self.idle.clear()
        return self.seq

    def invalidate_end(self, ranges: list[tuple[int, int]]) -> None:
        """Leave the window; the last one out makes ``seq`` even and wakes waiting faults."""
        self.active -= 1
        if self.active == 0:
            self.active_ranges.clear()
            self.seq += 1
            self.idle.set()
        else:
            for r in ranges:
                self.active_ranges.remove(r)

    def busy(self, start: int, end: int) -> bool:
        """Whether an active invalidation overlaps [start, end) (``read_begin`` would sleep)."""
        return any(lo < end and start < hi for lo, hi in self.active_ranges)
