"""Device access messages: DMA reads, writes and atomics through named translations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hmmirror.proto.messages.base import Message
from hmmirror.proto.messages.limits import MAX_DMA_PAGES
from hmmirror.proto.schema import Kind, wire


@dataclass(frozen=True)
class DmaRead(Message):
    """Agent → daemon: read ``npages`` pages at ``start`` through translations ``entries``.

    Bulk frame ``entries``: the ``npages`` u64 entries the agent translated with,
    all VALID. The daemon compares them with the live page table before and after
    the copy; a mismatch, or a pending INVALIDATE of the range, gets STALE and the
    data is discarded. Answered by ``dma_read_reply`` or ``error`` (STALE, EFAULT).
    """

    TYPE: ClassVar[str] = "dma_read"
    BULK: ClassVar[tuple[str, ...]] = ("entries",)
    mirror: int = wire(Kind.UINT)
    start: int = wire(Kind.UINT)
    npages: int = wire(Kind.UINT, MAX_DMA_PAGES)

    def bulk_sizes(self) -> tuple[int, ...]:
        """One entry frame of ``npages * 8`` bytes."""
        return (self.npages * 8,)


@dataclass(frozen=True)
class DmaReadReply(Message):
    """Daemon → agent, answering ``dma_read``. Bulk frame ``data``: ``npages * 4096`` bytes."""

    TYPE: ClassVar[str] = "dma_read_reply"
    BULK: ClassVar[tuple[str, ...]] = ("data",)
    mirror: int = wire(Kind.UINT)
    start: int = wire(Kind.UINT)
    npages: int = wire(Kind.UINT, MAX_DMA_PAGES)

    def bulk_sizes(self) -> tuple[int, ...]:
        """One data frame of ``npages * 4096`` bytes."""
        return (self.npages * 4096,)


@dataclass(frozen=True)
class DmaWrite(Message):
    """Agent → daemon: write ``data`` into the ``npages`` pages at ``start`` through ``entries``.

    The data lands at byte ``offset`` of the first page and is ``length`` bytes
    long (0 means ``npages * 4096``); the pages are exactly those the bytes touch,
    so a device write of a few bytes never rewrites the rest of the page. Bulk
    frames ``entries`` (``npages`` u64, all VALID|WRITE) and ``data``. Checked
    like ``dma_read`` before the copy. Answered by ``ok`` or ``error`` (STALE,
    EPERM for a read-only page, EFAULT, EINVAL for bytes that do not fit the pages).
    """

    TYPE: ClassVar[str] = "dma_write"
    BULK: ClassVar[tuple[str, ...]] = ("entries", "data")
    mirror: int = wire(Kind.UINT)
    start: int = wire(Kind.UINT)
    npages: int = wire(Kind.UINT, MAX_DMA_PAGES)
    offset: int = wire(Kind.UINT, 4095, default=0)
    length: int = wire(Kind.UINT, MAX_DMA_PAGES * 4096, default=0)

    def bulk_sizes(self) -> tuple[int, ...]:
        """An entry frame of ``npages * 8`` bytes, then the data."""
        return (self.npages * 8, self.length or self.npages * 4096)


@dataclass(frozen=True)
class DmaAtomic(Message):
    """Agent → daemon: an 8-byte atomic at ``start + offset`` through one entry.

    ``op`` is an ``AtomicOp``; ``offset`` is 8-byte aligned. Bulk frame
    ``entries``: the page's one u64 entry, VALID|WRITE. Checked like
    ``dma_write``. The daemon performs read, compute and write with nothing in
    between, so atomics through one daemon are atomic with respect to each other
    (``IBV_ATOMIC_HCA``), not with respect to the target's own CPU accesses.
    Answered by ``atomic_reply`` or ``error`` (STALE, EPERM, EFAULT, EINVAL).
    """

    TYPE: ClassVar[str] = "dma_atomic"
    BULK: ClassVar[tuple[str, ...]] = ("entries",)
    mirror: int = wire(Kind.UINT)
    start: int = wire(Kind.UINT)
    offset: int = wire(Kind.UINT, 4088)
    op: int = wire(Kind.UINT, 1)
    compare_add: int = wire(Kind.UINT)
    swap: int = wire(Kind.UINT, default=0)

    def bulk_sizes(self) -> tuple[int, ...]:
        """One entry frame of 8 bytes."""
        return (8,)


@dataclass(frozen=True)
class AtomicReply(Message):
    """Answers ``dma_atomic`` (daemon → agent) and ``rdma_atomic`` (agent → requester).

    ``old`` is the 8-byte little-endian value found before the operation.
    """

    TYPE: ClassVar[str] = "atomic_reply"
    old: int = wire(Kind.UINT)
