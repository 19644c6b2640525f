"""Synchronous invalidation fan-out: INVALIDATE to every overlapping mirror, wait for every ACK.

``Invalidator.invalidate`` is ``mmu_notifier_invalidate_range_start`` plus
``_end``: it opens a seq window on the mm, queues one item per overlapping
mirror, and returns once every session has acked (cumulatively) or been
evicted for missing its deadline. Items issued while a session still has an
INVALIDATE in flight are coalesced into one batch per loop tick; a lone
invalidation goes out at once, so it pays no batching delay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from hmmirror.daemon.mm import Mirror, Mm
from hmmirror.daemon.server import Transport, Unreachable
from hmmirror.daemon.session import Item, Session
from hmmirror.proto.codec import encode
from hmmirror.proto.messages import MAX_ITEMS, Event, Invalidate

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Invalidation:
    """One invalidate_range_start/_end pair in flight."""

    mm: Mm
    start: int
    end: int
    event: Event
    seq: int
    waiting: dict[Session, int] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    t0: float = 0.0
    acked_at: float = 0.0
    targets: int = 0

    def acked(self, session: Session, items: int = 1) -> None:
        """Count ``items`` of ``session``'s items as acked (or forgiven, on eviction)."""
        left = self.waiting.get(session)
        if left is None:
            return
        if left <= items:
            del self.waiting[session]
            if not self.waiting:
                self.acked_at = time.perf_counter()
                self.done.set()
        else:
            self.waiting[session] = left - items


class LatencyLog:
    """A ring of the last invalidation round trips, in microseconds."""

    def __init__(self, size: int = 1 << 16) -> None:
        self._ring = np.zeros(size, dtype=np.float64)
        self._count = 0

    def add(self, micros: float) -> None:
        """Record one round trip."""
        self._ring[self._count % len(self._ring)] = micros
        self._count += 1

    def percentiles(self, *qs: float) -> list[float]:
        """Percentiles over what the ring holds (0.0 when empty)."""
        n = min(self._count, len(self._ring))
        if n == 0:
            return [0.0 for _ in qs]
        return [float(v) for v in np.percentile(self._ring[:n], qs)]

    def reset(self) -> None:
        """Forget everything recorded."""
        self._count = 0


class Invalidator:
    """Owns the fan-out: queues, batches, ack accounting and deadline eviction."""

    def __init__(
        self,
        transport: Transport,
        ack_deadline: float,
        evict: Callable[[Session, str], None],
    ) -> None:
        self.transport = transport
        self.ack_deadline = ack_deadline
        self.evict = evict
        self.latency = LatencyLog()
        self.count = 0
        self._flush_pending: set[Session] = set()

    def begin(self, mm: Mm, start: int, end: int, event: Event) -> Invalidation:
        """Open the seq window and queue the items now, synchronously; ``finish`` waits.

        Splitting the two keeps detection and the zap of the shadow atomic with
        respect to the event loop: nobody can see the change half-announced.
        """
        seq = mm.invalidate_start(start, end)
        inv = Invalidation(mm, start, end, event, seq)
        inv.t0 = time.perf_counter()
        for mirror in list(mm.mirrors):
            if mirror.dead or not mirror.overlaps(start, end):
                continue
            mirror.zap(start, end)
            lo, hi = max(start, mirror.lo), min(end, mirror.hi)
            item = (mirror.id, seq, lo, hi, int(event))
            inv.waiting[mirror.session] = inv.waiting.get(mirror.session, 0) + 1
            self._queue(mirror.session, (item, inv, mirror))
        inv.targets = len(inv.waiting)
        if inv.waiting:
            self.count += 1
        else:
            inv.done.set()
        return inv

    async def finish(self, inv: Invalidation) -> Invalidation:
        """Wait for every ack (evicting whoever misses the deadline), then close the window."""
        try:
            if inv.targets:
                try:
                    await asyncio.wait_for(inv.done.wait(), self.ack_deadline)
                except TimeoutError:
                    for session in list(inv.waiting):
                        n = session.unacked[0][0] if session.unacked else session.next_n
                        self.evict(
                            session,
                            f"no ACK for INVALIDATE n={n} (seq {inv.seq}, {inv.event.name} "
                            f"[{inv.start:#x}, {inv.end:#x})) within {self.ack_deadline:g} s; "
                            "it may have been applied",
                        )
                else:
                    if inv.acked_at:  # not when evictions, rather than acks, ended the wait
                        self.latency.add((inv.acked_at - inv.t0) * 1e6)
            return inv
        finally:
            inv.mm.invalidate_end(inv.start, inv.end)

    async def invalidate(self, mm: Mm, start: int, end: int, event: Event) -> Invalidation:
        """Invalidate [start, end) of ``mm`` and wait until every overlapping mirror acked."""
        return await self.finish(self.begin(mm, start, end, event))

    def _queue(self, session: Session, item: Item) -> None:
        session.batch.append(item)
        if not session.unacked and session not in self._flush_pending:
            self.flush(session)  # nothing in flight: send at once, no batching delay
        elif session not in self._flush_pending:
            self._flush_pending.add(session)
            asyncio.get_running_loop().call_soon(self._scheduled_flush, session)

    def _scheduled_flush(self, session: Session) -> None:
        self._flush_pending.discard(session)
        self.flush(session)

    def flush(self, session: Session) -> None:
        """Send ``session``'s queued items now, as INVALIDATE batches."""
        while session.batch and not session.fenced:
            items, session.batch = session.batch[:MAX_ITEMS], session.batch[MAX_ITEMS:]
            n = session.next_n
            session.next_n += 1
            session.unacked.append((n, items))
            msg = Invalidate(n=n, items=tuple(item for item, _, _ in items))
            try:
                self.transport.send(session.identity, encode(msg, session.take_id()))
            except Unreachable as exc:
                self.evict(session, f"INVALIDATE n={n} could not be delivered: {exc}")
                return

    def on_ack(self, session: Session, n: int) -> None:
        """Apply a cumulative ``ACK(n)`` from ``session``."""
        while session.unacked and session.unacked[0][0] <= n:
            _, items = session.unacked.popleft()
            for _, inv, _ in items:
                inv.acked(session)

    def forgive(self, session: Session) -> None:
        """Drop ``session``'s outstanding items (it was evicted or left): nobody waits on it."""
        items = list(session.batch)
        for _, unacked in session.unacked:
            items.extend(unacked)
        session.batch.clear()
        session.unacked.clear()
        for _, inv, _ in items:
            inv.acked(session)

    def pending_for(self, mirror: Mirror, start: int, end: int) -> bool:
        """Whether ``mirror`` has an INVALIDATE of the range queued or unacked."""
        return mirror.session.pending_overlap(mirror, start, end)
