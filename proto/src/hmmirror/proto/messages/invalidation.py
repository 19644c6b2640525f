"""Invalidation: INVALIDATE and its cumulative ACK, EVICTED, and the target's own SYNC_RANGE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hmmirror.proto.messages.base import Message
from hmmirror.proto.messages.limits import MAX_ITEMS, U32_MAX
from hmmirror.proto.schema import Kind, wire


@dataclass(frozen=True)
class Invalidate(Message):
    """Daemon → agent: zap these ranges of ``mirror``, fence in-flight DMA, then ``ack``.

    ``n`` is this connection's message number: it grows by one per INVALIDATE
    the daemon sends on the session. Each item is ``[seq, start, end, event]``:
    the mm's odd ``seq`` to record with ``set_seq``, the byte range [start, end)
    and an ``Event``; each item is one invalidation. RELEASE and EVICT items
    cover the whole mirror.

    ``mirrors`` (1.2, only to a session whose ``hello`` said 1.2 or more): item
    ``i`` is for mirror ``mirrors[i]``, or for ``mirror`` past the end of the list
    (hmmd sends one per item, the first being ``mirror``): one message carries a
    batch over several mirrors of the session (several target processes) where
    1.1 took one message each.
    """

    TYPE: ClassVar[str] = "invalidate"
    n: int = wire(Kind.UINT)
    mirror: int = wire(Kind.UINT)
    items: tuple[tuple[int, int, int, int], ...] = wire(Kind.ITEMS, MAX_ITEMS)
    mirrors: tuple[int, ...] = wire(Kind.UINTS, MAX_ITEMS, default=(), omit_default=True)


@dataclass(frozen=True)
class Ack(Message):
    """Agent → daemon: every INVALIDATE numbered up to ``n`` is done (cumulative).

    Send it only after every item up to ``n`` was zapped and no DMA of the agent
    still uses the zapped pages. Acks need no reply.
    """

    TYPE: ClassVar[str] = "ack"
    n: int = wire(Kind.UINT)


@dataclass(frozen=True)
class Evicted(Message):
    """Daemon → agent: the session was fenced; these mirrors are gone.

    Sent best-effort when the agent missed an ack deadline or its lease. Every
    later request other than ``hello`` gets FENCED. The agent drops all its
    entries and says ``hello`` again.
    """

    TYPE: ClassVar[str] = "evicted"
    mirrors: tuple[int, ...] = wire(Kind.UINTS, 4096)
    reason: str = wire(Kind.STR, 256)


@dataclass(frozen=True)
class SyncRange(Message):
    """Agent or target → daemon: invalidate ``ranges`` of process ``pid`` now.

    ``ranges`` is a list of at most 4096 [start, end) pairs, each counted as one
    invalidation. The daemon invalidates them with ``event`` (an ``Event``)
    exactly as if its watcher had seen the changes, and answers ``ok`` only once
    every mirror overlapping any of them has acked or been evicted. This is
    ``sync_cpu_device_pagetables`` made literal: a target that calls it before
    changing its memory gets the kernel's invalidate-before-change order.
    Clients coalesce concurrent calls into one message. Answered by ``ok``, or
    ``error`` (ESRCH for an unknown process, EINVAL). With ``strict`` (the
    target's own sync call), a mirror evicted instead of acking makes the answer
    ``error`` INCOMPLETE, naming who: the range is still invalidated.
    """

    TYPE: ClassVar[str] = "sync_range"
    pid: int = wire(Kind.UINT, U32_MAX)
    ranges: tuple[tuple[int, int], ...] = wire(Kind.INTERVALS, MAX_ITEMS)
    event: int = wire(Kind.UINT, 255)
    strict: bool = wire(Kind.BOOL, default=False)
