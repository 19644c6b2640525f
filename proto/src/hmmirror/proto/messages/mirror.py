"""Mirror messages: REGISTER and UNREGISTER, and FAULT (``hmm_range_fault``) with its replies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hmmirror.proto.messages.base import Message
from hmmirror.proto.messages.limits import MAX_DMA_PAGES, MAX_FAULT_PAGES, MAX_INTERVALS, U32_MAX
from hmmirror.proto.schema import Kind, wire


@dataclass(frozen=True)
class Register(Message):
    """Agent → daemon: mirror ``intervals`` of process ``pid``. Answered by ``registered``.

    ``start_time`` is the target's start time in clock ticks since boot (field
    22 of ``/proc/PID/stat``); 0 means "whatever process has this pid now". The
    daemon refuses a mismatch with ESRCH, so a reused pid is never mirrored by
    mistake. ``access`` is an ``Access`` bit set. Intervals are page-aligned,
    non-empty, below 2^47 and at most 64 of them. ``watch_writes`` subscribes the
    mirror to WRITTEN invalidations of the pages the target writes (for agents
    that cache data, not only translations); it needs the target's userfaultfd.
    ``strict_writes`` goes further: a write to a page the mirror holds blocks the
    writing thread until the mirrors have acked the WRITTEN invalidation (it
    needs a second, "strict" userfaultfd from the target).
    """

    TYPE: ClassVar[str] = "register"
    pid: int = wire(Kind.UINT, U32_MAX)
    start_time: int = wire(Kind.UINT)
    intervals: tuple[tuple[int, int], ...] = wire(Kind.INTERVALS, MAX_INTERVALS)
    access: int = wire(Kind.UINT, 3)
    watch_writes: bool = wire(Kind.BOOL, default=False)
    strict_writes: bool = wire(Kind.BOOL, default=False)


@dataclass(frozen=True)
class Registered(Message):
    """Daemon → agent, answering ``register``.

    ``mirror`` is the new mirror's id, unique within the daemon's epoch.
    ``start_time`` is the identity the daemon bound (see ``register``). ``seq``
    is the mm's current sequence number (even when no invalidation is active).
    """

    TYPE: ClassVar[str] = "registered"
    mirror: int = wire(Kind.UINT)
    pid: int = wire(Kind.UINT, U32_MAX)
    start_time: int = wire(Kind.UINT)
    seq: int = wire(Kind.UINT)


@dataclass(frozen=True)
class Unregister(Message):
    """Agent → daemon: drop ``mirror``. Answered by ``ok``."""

    TYPE: ClassVar[str] = "unregister"
    mirror: int = wire(Kind.UINT)


@dataclass(frozen=True)
class Fault(Message):
    """Agent → daemon: ``hmm_range_fault`` over ``npages`` pages at ``start``.

    Answered by ``fault_reply``, or by ``error`` with EFAULT (no VMA or an
    unreadable one, in POPULATE mode), EPERM (``write`` on a VMA without write
    permission, or a mirror without WRITE access), EBUSY (invalidations kept
    racing the fault for 1000 ms) or EINVAL (outside the mirror). ``mode`` is a
    ``FaultMode``. The range lies inside one of the mirror's intervals.

    ``read`` asks the daemon to also read the pages through the entries it hands
    out, in the same trip (a POPULATE fault of at most ``max_dma_pages``): the
    answer is then ``fault_read_reply``, or a plain ``fault_reply`` when the read
    could not be done (the agent then reads as usual).
    """

    TYPE: ClassVar[str] = "fault"
    mirror: int = wire(Kind.UINT)
    start: int = wire(Kind.UINT)
    npages: int = wire(Kind.UINT, MAX_FAULT_PAGES)
    write: bool = wire(Kind.BOOL)
    mode: int = wire(Kind.UINT, 2)
    read: bool = wire(Kind.BOOL, default=False)


@dataclass(frozen=True)
class FaultReply(Message):
    """Daemon → agent, answering ``fault``.

    Bulk frame ``entries``: ``npages`` little-endian u64 ``hmm_pfn`` values.
    ``seq`` is the mm's (even) sequence number when the entries were read. The
    agent installs them only if no INVALIDATE for this mirror arrived since it
    sent the FAULT (``mmu_interval_read_retry``); otherwise it faults again.
    """

    TYPE: ClassVar[str] = "fault_reply"
    BULK: ClassVar[tuple[str, ...]] = ("entries",)
    mirror: int = wire(Kind.UINT)
    start: int = wire(Kind.UINT)
    npages: int = wire(Kind.UINT, MAX_FAULT_PAGES)
    seq: int = wire(Kind.UINT)

    def bulk_sizes(self) -> tuple[int, ...]:
        """One entry frame of ``npages * 8`` bytes."""
        return (self.npages * 8,)


@dataclass(frozen=True)
class FaultReadReply(Message):
    """Daemon → agent, answering a ``fault`` with ``read``: the entries and the data.

    Bulk frames ``entries`` (``npages`` u64, as ``fault_reply``) and ``data``
    (``npages * 4096`` bytes), read through those entries and checked against
    the live page table before and after the copy, as ``dma_read`` is. The
    agent installs the entries under the same rule as ``fault_reply``; if it may
    not, it discards the data too and faults again.
    """

    TYPE: ClassVar[str] = "fault_read_reply"
    BULK: ClassVar[tuple[str, ...]] = ("entries", "data")
    mirror: int = wire(Kind.UINT)
    start: int = wire(Kind.UINT)
    npages: int = wire(Kind.UINT, MAX_DMA_PAGES)
    seq: int = wire(Kind.UINT)

    def bulk_sizes(self) -> tuple[int, ...]:
        """An entry frame of ``npages * 8`` bytes, then ``npages * 4096`` bytes of data."""
        return (self.npages * 8, self.npages * 4096)
