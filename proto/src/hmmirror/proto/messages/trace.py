"""The timeline messages (protocol 1.1): ``trace`` and ``trace_reply``, for ``hmmctl trace``.

A 1.0 agent never needs them: only root or an ``inspect`` grant may ask, and
nothing an agent does changes when a trace runs. The events travel as one bulk
frame of little-endian u64 rows (``TRACE_COLUMNS``), the way page tables do, so
that a full trace stays under ``MAX_FRAME`` and out of the 1 MiB body.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from hmmirror.proto.messages.base import Message
from hmmirror.proto.schema import Kind, wire

#: The most events one trace keeps (72 bytes each: 2.25 MiB, under ``MAX_FRAME``).
MAX_TRACE_EVENTS = 1 << 15
#: The longest trace, in milliseconds (ten minutes).
MAX_TRACE_MS = 600_000
#: Columns of ``trace_reply``'s ``events`` rows, in order (SPEC §4.8).
TRACE_COLUMNS = ("t_ns", "kind", "mirror", "session", "pid", "id", "start", "end", "arg")


class TraceKind(IntEnum):
    """What a ``trace_reply`` row records (its ``kind`` column); SPEC §4.8 gives each row's
    ``id`` and ``arg``."""

    FAULT = 1
    """A ``fault`` request arrived: id = its header id, arg = 1 if ``write``."""
    FAULT_REPLY = 2
    """Its ``fault_reply`` was sent: id = the request's header id, arg = the reply's seq."""
    ERROR = 3
    """A request naming a mirror was answered ``error``: id = its header id, arg = the code."""
    INVALIDATE = 4
    """An invalidation's items were queued for a mirror: id = seq, arg = the event."""
    INVALIDATE_END = 5
    """Its window closed (every ACK in, or evictions): mirror 0, id = seq, arg = 1 if some
    session was evicted or left instead of acking."""
    ACK = 6
    """A mirror's items were acked: id = the invalidation's seq, arg = the ACK's ``n``."""
    STALE = 7
    """A DMA was refused STALE: mirror 0, arg = 0 an INVALIDATE pending, 1 the pagemap
    changed before the copy, 2 during it."""
    EVICT = 8
    """The mirror's session was evicted: id = the index of the reason in ``names``."""


@dataclass(frozen=True)
class Trace(Message):
    """Root or ``inspect`` grant → daemon: record a timeline for ``duration_ms``, then answer
    with ``trace_reply``. Needs no session. At most ``max_events`` events are kept (the
    newest). One trace runs at a time: another gets EBUSY."""

    TYPE: ClassVar[str] = "trace"
    duration_ms: int = wire(Kind.UINT, MAX_TRACE_MS)
    max_events: int = wire(Kind.UINT, MAX_TRACE_EVENTS, default=MAX_TRACE_EVENTS)


@dataclass(frozen=True)
class TraceReply(Message):
    """Daemon → requester: ``count`` events as one bulk frame ``events`` of little-endian u64
    rows of ``TRACE_COLUMNS`` (``t_ns`` counts from the trace's start); ``dropped`` older
    events did not fit; ``duration_ns`` is how long it recorded; ``names`` maps
    ``"session:ID"`` to agent names and ``"evict:N"`` to eviction reasons."""

    TYPE: ClassVar[str] = "trace_reply"
    BULK: ClassVar[tuple[str, ...]] = ("events",)
    count: int = wire(Kind.UINT, MAX_TRACE_EVENTS)
    dropped: int = wire(Kind.UINT)
    duration_ns: int = wire(Kind.UINT)
    names: dict[str, int | float | str] = wire(Kind.STATS, 256)

    def bulk_sizes(self) -> tuple[int, ...]:
        """One frame of ``count`` rows of ``TRACE_COLUMNS`` u64 values."""
        return (self.count * len(TRACE_COLUMNS) * 8,)
