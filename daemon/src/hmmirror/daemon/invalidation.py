"""Synchronous invalidation fan-out: INVALIDATE to every overlapping mirror, wait for every ACK.

``Invalidator.invalidate`` is ``mmu_notifier_invalidate_range_start`` plus
``_end``: it opens a seq window on the mm, queues one item per overlapping
mirror, and returns once every session has acked (cumulatively) or been
evicted for missing its deadline. The items go out through each session's
outbox (``outbox.Courier``, the only writer of a session's messages, which
numbers and batches them); this module does the ack accounting over what the
outbox says it sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from hmmirror.daemon.histogram import AckHistogram
from hmmirror.daemon.outbox import Courier, Items, Outbox
from hmmirror.daemon.state import Mirror, Mm, Session
from hmmirror.daemon.trace import tracer
from hmmirror.proto.messages import MAX_ITEMS, Event

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Invalidation:
    """One invalidate_range_start/_end pair in flight, over one or more ranges."""

    mm: Mm
    ranges: list[tuple[int, int]]
    event: Event
    seq: int
    done: asyncio.Future[None]
    waiting: dict[Session, int] = field(default_factory=dict)
    t0: float = 0.0
    acked_at: float = 0.0
    targets: int = 0
    timer: asyncio.TimerHandle | None = None
    finished: bool = False
    on_done: list[Callable[[], None]] = field(default_factory=list)
    """Called synchronously when the window closes (before ``done`` wakes anyone)."""
    not_acked: list[str] = field(default_factory=list)
    """Sessions ("name (session N)") that were evicted or left instead of acking."""

    @property
    def start(self) -> int:
        """Lowest invalidated address."""
        return min(lo for lo, _ in self.ranges)

    @property
    def end(self) -> int:
        """End of the highest invalidated range."""
        return max(hi for _, hi in self.ranges)

    def forgiven(self, session: Session, items: int) -> bool:
        """Like ``acked``, for a session that was evicted or left instead: remember who."""
        if session in self.waiting:
            self.not_acked.append(f"{session.name} (session {session.id})")
        return self.acked(session, items)

    def acked(self, session: Session, items: int = 1) -> bool:
        """Count ``items`` of ``session``'s items as acked or forgiven; True once none are left."""
        left = self.waiting.get(session)
        if left is None:
            return False
        if left <= items:
            del self.waiting[session]
            if not self.waiting:
                self.acked_at = time.perf_counter()
                return True
        else:
            self.waiting[session] = left - items
        return False


class LatencyLog:
    """A ring of the last invalidation round trips, in microseconds."""

    def __init__(self, size: int = 1 << 16) -> None:
        # array('d'): storing a float in it costs a fraction of a numpy scalar store, and
        # this runs once per invalidation; numpy only does the rare percentile query. A list
        # would keep a float object per slot alive, so hmmd's RSS would creep up by ~1.5 MB
        # over its first 65,536 invalidations (the soak benchmark saw it).
        self._ring = array("d", bytes(8 * size))
        self._count = 0
        #: Every round trip since hmmd started, in buckets, for /metrics' Histogram: the
        #: ring alone loses what a slow scraper did not see before it was overwritten.
        self.histogram = AckHistogram()

    def add(self, micros: float) -> None:
        """Record one round trip."""
        self._ring[self._count % len(self._ring)] = micros
        self._count += 1
        self.histogram.observe(micros)

    @property
    def recorded(self) -> int:
        """How many round trips were recorded since the start (or the last reset)."""
        return self._count

    def percentiles(self, *qs: float) -> list[float]:
        """Percentiles over what the ring holds (0.0 when empty)."""
        n = min(self._count, len(self._ring))
        if n == 0:
            return [0.0 for _ in qs]
        return [float(v) for v in np.percentile(np.frombuffer(self._ring, np.float64, n), qs)]

    def reset(self) -> None:
        """Forget everything recorded."""
        self._count = 0


#: What a session's outbox queues: items for one mirror from one invalidation, with both.
Chunk = tuple[Items, Invalidation, Mirror]


def _clip(
    ranges: list[tuple[int, int]], mirror: Mirror, single: bool, seq: int, ev: int
) -> tuple[list[Items], int]:
    """``mirror``'s items for ``ranges`` (clipped to its bounds, in chunks of at most
    ``MAX_ITEMS``) and how many there are."""
    mlo, mhi = mirror.lo, mirror.hi
    if len(ranges) == 1:  # the common case: one range, no list to build
        s, e = ranges[0]
        if not (s < mhi and mlo < e and (single or mirror.overlaps(s, e))):
            return [], 0
        return [Items([(seq, s if s > mlo else mlo, e if e < mhi else mhi, ev)])], 1
    items = [
        (seq, s if s > mlo else mlo, e if e < mhi else mhi, ev)
        for s, e in ranges
        if s < mhi and mlo < e and (single or mirror.overlaps(s, e))
    ]
    parts = [Items(items[i : i + MAX_ITEMS]) for i in range(0, len(items), MAX_ITEMS)]
    return parts, len(items)


class Invalidator:
    """Owns the fan-out: what each mirror is sent, ack accounting and deadline eviction."""

    def __init__(
        self,
        courier: Courier[Invalidation],
        ack_deadline: float,
        evict: Callable[[Session, str], None],
        idle: Callable[[Mm], None],
    ) -> None:
        self.courier = courier
        self.ack_deadline = ack_deadline
        self.evict = evict
        """Fences a session that missed its deadline (``sessions.Sessions.evict``), which
        must ``forgive`` it."""
        self.idle = idle
        """Called when an mm's last open window closes (it may have lost its mirrors meanwhile)."""
        self.latency = LatencyLog()
        self.count = 0
        #: CLOCK_MONOTONIC when the last invalidation had all its acks (0: none yet).
        self.last_acked = 0.0
        #: ACKs that acked nothing new: late, repeated, or for items already forgiven.
        self.stray_acks = 0

    def outbox(self, session: Session) -> Outbox[Invalidation]:
        """``session``'s outbox (made on first use)."""
        return self.courier.outbox(session)

    def sent(self, session: Session) -> int:
        """How many INVALIDATEs ``session`` was sent (the highest ``n`` it may ack)."""
        return self.courier.sent(session)

    def begin(self, mm: Mm, ranges: list[tuple[int, int]], event: Event) -> Invalidation:
        """Open the seq window over ``ranges`` and queue the items now, synchronously.

        Each range counts as one invalidation; announcing several together (a
        batched ``sync_range``, or one watcher poll's changes) shares a window
        and the ack accounting. Completion (every ack in, or the deadline's
        evictions done) closes the window and resolves ``inv.done`` from
        callbacks: no task waits per invalidation. Doing detection and the
        shadow zap synchronously keeps them atomic with respect to the event
        loop: nobody sees a change half-announced.
        """
        loop = asyncio.get_running_loop()
        seq = mm.invalidate_start(ranges)
        inv = Invalidation(mm, ranges, event, seq, loop.create_future())
        inv.t0 = time.perf_counter()
        if len(ranges) == 1:
            lo, hi = ranges[0]
        else:
            lo = min(start for start, _ in ranges)
            hi = max(end for _, end in ranges)
        ev = int(event)
        # Items carry no mirror id, so every mirror whose bounds clip the ranges the same
        # way shares one item list, and it is packed for the wire once (Items.packed).
        shared_by_bounds: dict[tuple[int, int], tuple[list[Items], int]] = {}
        chunks: list[tuple[Session, Chunk]] = []
        waiting = inv.waiting
        written = event == Event.WRITTEN
        for mirror in list(mm.mirrors):
            if mirror.dead or lo >= mirror.hi or hi <= mirror.lo:
                continue
            if written and not mirror.watch_writes:
                continue  # a write changes no translation: only data caches care
            spans = mirror.spans
            single = len(spans) == 1
            if not single and not mirror.overlaps(lo, hi):
                continue
            bounds = (mirror.lo, mirror.hi)
            shared = shared_by_bounds.get(bounds) if single else None
            if shared is None:
                shared = _clip(ranges, mirror, single, seq, ev)
                if single:
                    shared_by_bounds[bounds] = shared
            parts, count = shared
            if not count:
                continue
            if spans[0].held if single else any(span.held for span in spans):
                for part in parts:
                    for _, start, end, _ in part.items:
                        mirror.zap(start, end)
            session = mirror.session
            waiting[session] = waiting.get(session, 0) + count
            for part in parts:
                chunks.append((session, (part, inv, mirror)))
        inv.targets = len(waiting)
        if tracer.on:
            tracer.invalidation(seq, mm, ev, chunks)
        if not waiting:
            self._complete(inv)
            return inv
        self.count += len(ranges)
        inv.timer = loop.call_later(self.ack_deadline, self._expire, inv)
        # Send only once every target is counted: a send that fails evicts its session and
        # forgives its items, and that must not close the window on the others still to come.
        queue = self.courier.queue
        for session, chunk in chunks:
            if session.fenced:  # evicted earlier in this fan-out: nobody will ack it
                self._forgive(session, chunk)
            else:
                queue(session, chunk)
        return inv

    def _complete(self, inv: Invalidation) -> None:
        """invalidate_range_end: close the window, record the round trip, wake the waiter."""
        if inv.finished:
            return
        inv.finished = True
        if tracer.on:
            tracer.invalidation_end(
                inv.seq, inv.mm.pid, inv.start, inv.end, inv.targets, bool(inv.not_acked)
            )
        if inv.timer is not None:
            inv.timer.cancel()
        inv.mm.invalidate_end(inv.ranges)
        if inv.mm.active == 0:
            self.idle(inv.mm)
        if inv.targets and inv.acked_at and not inv.waiting:
            self.latency.add((inv.acked_at - inv.t0) * 1e6)
            self.last_acked = time.monotonic()
        for hook in inv.on_done:
            hook()
        if not inv.done.done():
            inv.done.set_result(None)

    def _expire(self, inv: Invalidation) -> None:
        """The deadline passed: evict every session that has not acked, then complete."""
        inv.acked_at = 0.0  # evictions, not acks, ended this one: keep it out of the latency log
        try:
            for session in list(inv.waiting):
                box = self.outbox(session)
                n = box.unacked[0][0] if box.unacked else box.next_n
                self.evict(
                    session,
                    f"no ACK for INVALIDATE n={n} (seq {inv.seq}, {inv.event.name} "
                    f"[{inv.start:#x}, {inv.end:#x})) within {self.ack_deadline:g} s; "
                    "it may have been applied",
                )
                inv.waiting.pop(session, None)
        finally:
            # Whatever an eviction raised, the window closes: seq must never stay odd.
            inv.waiting.clear()
            inv.acked_at = 0.0
            self._complete(inv)

    def announce(
        self, mm: Mm, changes: list[tuple[int, int, Event]], then: Callable[[], None] | None = None
    ) -> None:
        """Begin an invalidation per event among ``changes`` now (``watch.proc.FanOut``);
        ``then`` is called once every one of them completed."""
        by_event: dict[Event, list[tuple[int, int]]] = {}
        for start, end, event in changes:
            by_event.setdefault(event, []).append((start, end))
        started = [self.begin(mm, ranges, event) for event, ranges in by_event.items()]
        if then is None:
            return
        pending = [inv for inv in started if not inv.finished]
        if not pending:
            then()
            return
        left = [len(pending)]

        def one_done() -> None:
            """One invalidation completed: ``then`` once all of them have."""
            left[0] -= 1
            if left[0] == 0:
                then()

        for inv in pending:
            inv.on_done.append(one_done)

    async def invalidate(self, mm: Mm, start: int, end: int, event: Event) -> Invalidation:
        """Invalidate [start, end) of ``mm`` and wait until every overlapping mirror acked."""
        inv = self.begin(mm, [(start, end)], event)
        await asyncio.shield(inv.done)
        return inv

    def _forgive(self, session: Session, chunk: Chunk) -> None:
        """Forgive ``chunk`` of a fenced session: nobody will ack it."""
        part, inv, _ = chunk
        if inv.forgiven(session, len(part.items)):
            self._complete(inv)

    def on_ack(self, session: Session, n: int) -> None:
        """Apply a cumulative ``ACK(n)`` from ``session``. One that acks nothing new (late,
        repeated, or after the session's items were forgiven) is only counted."""
        box = self.courier.boxes.get(session)
        if box is None or not box.unacked or box.unacked[0][0] > n:
            self.stray_acks += 1
            return
        while box.unacked and box.unacked[0][0] <= n:
            _, _, counts = box.unacked.popleft()
            for inv, count in counts.items():
                if inv.acked(session, count):
                    self._complete(inv)
        if box.batch:
            self.courier.acked(session)  # items waited for this ACK: they go out this tick

    def forgive(self, session: Session) -> None:
        """Drop ``session``'s outstanding items (it was evicted or left): nobody waits on it."""
        box = self.courier.forget(session)
        if box is None:
            return
        chunks = list(box.batch)
        for _, unacked, _ in box.unacked:
            chunks.extend(unacked)
        for part, inv, _ in chunks:
            if inv.forgiven(session, len(part.items)):
                self._complete(inv)

    def pending_for(self, mirror: Mirror, start: int, end: int) -> bool:
        """Whether ``mirror`` has an INVALIDATE of the range queued or unacked."""
        box = self.courier.boxes.get(mirror.session)
        return box is not None and box.pending_overlap(mirror, start, end)
