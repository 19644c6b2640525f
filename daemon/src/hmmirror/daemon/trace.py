"""The timeline recorder behind ``hmmctl trace`` (SPEC §4.8): faults, invalidations, acks,
STALE refusals and evictions, per mirror, as they happen.

Off by default, and then free: every hook in the hot paths is ``if tracer.on:``, one
attribute test, and nothing is called. While a ``trace`` request runs, each hook appends
one tuple of ints (``TRACE_COLUMNS``, the clock first) to a bounded ring that keeps the
newest ``max_events``; names (agents, eviction reasons) go to a small string table. The
``trace`` handler (``handlers.on_trace``) turns it on, waits, and sends what was kept.

``tracer`` is the one recorder of this hmmd (one daemon per process): a module global,
so the hooks need no plumbing through the services, and a leaf, importing no daemon module
at run time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from hmmirror.proto.messages import TRACE_COLUMNS, TraceKind

if TYPE_CHECKING:
    from hmmirror.daemon.state import Mirror, Mm, Session

U64_MAX = (1 << 64) - 1
#: Rows of the string table for agent names, and for eviction reasons (256 in all).
MAX_SESSION_NAMES = 192
MAX_REASONS = 63

_FAULT, _FAULT_REPLY, _ERROR = (
    int(TraceKind.FAULT),
    int(TraceKind.FAULT_REPLY),
    int(TraceKind.ERROR),
)
_INVALIDATE, _INVALIDATE_END = int(TraceKind.INVALIDATE), int(TraceKind.INVALIDATE_END)
_ACK, _STALE, _EVICT = int(TraceKind.ACK), int(TraceKind.STALE), int(TraceKind.EVICT)


class HasItems(Protocol):
    """A chunk's items (``outbox.Items``): wire items ``(seq, start, end, event)``."""

    items: list[tuple[int, int, int, int]]


#: What the fan-out queues: (session, (items, tag, mirror)).
Queued = tuple[object, tuple[HasItems, object, "Mirror"]]


@dataclass(frozen=True)
class Recording:
    """What one trace kept: ``events`` (count rows of ``TRACE_COLUMNS`` little-endian u64, clock
    from the start), how many older ones were dropped, how long it ran, and the names."""

    events: np.ndarray[Any, np.dtype[np.uint64]]
    count: int
    dropped: int
    duration_ns: int
    names: dict[str, int | float | str]


class Tracer:
    """Records the timeline while ``on``; each hook below is called only when it is."""

    __slots__ = ("_events", "_names", "_reasons", "_seen", "_t0", "on")

    def __init__(self) -> None:
        self.on = False
        self._events: deque[tuple[int, ...]] = deque(maxlen=1)
        self._t0 = 0
        self._seen = 0
        self._names: dict[str, int | float | str] = {}
        self._reasons: dict[str, int] = {}

    # --- on and off -----------------------------------------------------------------------------

    def start(self, max_events: int) -> None:
        """Start recording, keeping the newest ``max_events`` (the caller checked none runs)."""
        self._events = deque(maxlen=max(1, max_events))
        self._names, self._reasons, self._seen = {}, {}, 0
        self._t0 = time.perf_counter_ns()
        self.on = True

    def stop(self) -> Recording:
        """Stop recording; return what was kept, clock relative to the start."""
        self.on = False
        duration = time.perf_counter_ns() - self._t0
        rows = list(self._events)
        self._events = deque(maxlen=1)
        # u64 throughout: a peer's header ids (and so the ``id`` column) may use all 64 bits.
        table = np.array(rows, dtype=np.uint64).reshape(-1, len(TRACE_COLUMNS))
        table[:, 0] -= np.uint64(self._t0)  # every stamp was taken after the start
        events = np.ascontiguousarray(table.astype("<u8").ravel())
        names, self._names = self._names, {}
        return Recording(events, len(rows), max(0, self._seen - len(rows)), duration, names)

    # --- recording --------------------------------------------------------------------------------

    def _row(
        self, kind: int, mirror: int, session: int, pid: int, id: int, start: int, end: int,
        arg: int,
    ) -> None:  # fmt: skip
        """Append one event, stamped now."""
        self._seen += 1
        self._events.append(
            (time.perf_counter_ns(), kind, mirror, session, pid, id, start, end, arg)
        )

    def _session(self, session: Session) -> int:
        """``session``'s id, its agent's name noted in the string table (while there is room)."""
        key = f"session:{session.id}"
        if key not in self._names and len(self._names) < MAX_SESSION_NAMES:
            self._names[key] = session.name[:256]
        return session.id

    def fault(self, mirror: Mirror, rid: int, start: int, end: int, write: bool) -> None:
        """A ``fault`` request (header id ``rid``) for [start, end) of ``mirror`` arrived."""
        sid = self._session(mirror.session)
        self._row(_FAULT, mirror.id, sid, mirror.mm.pid, rid, start, end, int(write))

    def fault_reply(self, mirror: Mirror, rid: int, start: int, end: int, seq: int) -> None:
        """The reply to fault ``rid`` went out, stamped with ``seq``."""
        sid = self._session(mirror.session)
        self._row(_FAULT_REPLY, mirror.id, sid, mirror.mm.pid, rid, start, end, seq)

    def error(self, session: Session | None, msg: object, rid: int, code: int) -> None:
        """A request ``msg`` (header id ``rid``) was answered ``error`` ``code``: recorded when
        it names a mirror of ``session`` (fault, dma_*, unregister)."""
        mirror_id = getattr(msg, "mirror", None)
        if session is None or type(mirror_id) is not int:
            return
        mirror = session.mirrors.get(mirror_id)
        pid = mirror.mm.pid if mirror is not None else 0
        start = getattr(msg, "start", getattr(msg, "addr", 0))
        npages = getattr(msg, "npages", 0)
        start = start if type(start) is int else 0
        end = min(start + (npages << 12), U64_MAX) if type(npages) is int else start
        self._row(_ERROR, mirror_id, self._session(session), pid, rid, start, end, code)

    def invalidation(self, seq: int, mm: Mm, event: int, chunks: Iterable[Queued]) -> None:
        """Invalidation ``seq`` of ``mm`` queued ``chunks`` (session, (items, tag, mirror)):
        one row per mirror, over the span of its items."""
        spans: dict[Mirror, list[int]] = {}
        for _, (part, _, mirror) in chunks:
            items = part.items
            lo, hi = min(i[1] for i in items), max(i[2] for i in items)
            have = spans.get(mirror)
            if have is None:
                spans[mirror] = [lo, hi]
            else:
                have[0], have[1] = min(have[0], lo), max(have[1], hi)
        for mirror, (lo, hi) in spans.items():
            sid = self._session(mirror.session)
            self._row(_INVALIDATE, mirror.id, sid, mm.pid, seq, lo, hi, event)

    def invalidation_end(
        self, seq: int, pid: int, start: int, end: int, targets: int, forgiven: bool
    ) -> None:
        """Invalidation ``seq`` of ``pid`` closed its window (one with no mirror is skipped)."""
        if targets:
            self._row(_INVALIDATE_END, 0, 0, pid, seq, start, end, int(forgiven))

    def acked(
        self, session: Session, n: int, chunks: Sequence[tuple[HasItems, Any, Mirror]]
    ) -> None:
        """``ACK`` covered INVALIDATE ``n`` of ``session``: one row per (mirror, seq) in it."""
        sid = self._session(session)
        done: set[tuple[int, int]] = set()
        for part, tag, mirror in chunks:
            seq = int(getattr(tag, "seq", 0))
            if (mirror.id, seq) in done:
                continue
            done.add((mirror.id, seq))
            items = part.items
            lo, hi = min(i[1] for i in items), max(i[2] for i in items)
            self._row(_ACK, mirror.id, sid, mirror.mm.pid, seq, lo, hi, n)

    def stale(self, pid: int, start: int, end: int, reason: int) -> None:
        """A DMA of [start, end) of ``pid`` was refused STALE (``reason``: see ``TraceKind``)."""
        self._row(_STALE, 0, 0, pid, 0, start, end, reason)

    def evicted(self, session: Session, reason: str) -> None:
        """``session`` is being evicted for ``reason``: one row per mirror it still has (a
        session without mirrors has no track to show it on)."""
        sid = self._session(session)
        index = self._reasons.get(reason)
        if index is None:
            index = len(self._reasons)
            if index < MAX_REASONS:
                self._reasons[reason] = index
                self._names[f"evict:{index}"] = reason[:256]
        for mirror in list(session.mirrors.values()):
            self._row(_EVICT, mirror.id, sid, mirror.mm.pid, index, mirror.lo, mirror.hi, 0)


#: This hmmd's recorder; every hook tests ``tracer.on`` first.
tracer = Tracer()
