"""The RDMA service's messages (requester ↔ hm-agent): READ, WRITE, ATOMIC and ``stat_mr``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hmmirror.proto.messages.base import Message
from hmmirror.proto.messages.limits import MAX_RDMA_BYTES, NAME_MAX, STAT_MR_COLUMNS
from hmmirror.proto.schema import Kind, wire


@dataclass(frozen=True)
class RdmaRead(Message):
    """Requester → agent: RDMA READ of ``length`` bytes at virtual address ``addr`` of ``rkey``.

    Any byte alignment. Answered by ``rdma_read_reply``, or ``error`` with
    REMOTE_ACCESS (unknown rkey, outside the MR, no REMOTE_READ), EFAULT (an
    unmapped page), EBUSY or ESRCH. ``rkey`` is a u64 mkey (in hm-agent a 24-bit
    index and 40 secret random bits); an MR the requester holds no grant on
    answers REMOTE_ACCESS exactly as an unknown rkey does.
    """

    TYPE: ClassVar[str] = "rdma_read"
    rkey: int = wire(Kind.UINT)
    addr: int = wire(Kind.UINT)
    length: int = wire(Kind.UINT, MAX_RDMA_BYTES)


@dataclass(frozen=True)
class RdmaReadReply(Message):
    """Agent → requester, answering ``rdma_read``. Bulk frame ``data``: ``length`` bytes."""

    TYPE: ClassVar[str] = "rdma_read_reply"
    BULK: ClassVar[tuple[str, ...]] = ("data",)
    length: int = wire(Kind.UINT, MAX_RDMA_BYTES)

    def bulk_sizes(self) -> tuple[int, ...]:
        """One data frame of ``length`` bytes."""
        return (self.length,)


@dataclass(frozen=True)
class RdmaWrite(Message):
    """Requester → agent: RDMA WRITE of the bulk frame ``data`` at ``addr`` of ``rkey``.

    Answered by ``ok``, or ``error`` with REMOTE_ACCESS (unknown rkey, outside
    the MR, no REMOTE_WRITE), EPERM (a page the target maps read-only), EFAULT
    (an unmapped page), EBUSY or ESRCH.
    """

    TYPE: ClassVar[str] = "rdma_write"
    BULK: ClassVar[tuple[str, ...]] = ("data",)
    rkey: int = wire(Kind.UINT)
    addr: int = wire(Kind.UINT)
    length: int = wire(Kind.UINT, MAX_RDMA_BYTES)

    def bulk_sizes(self) -> tuple[int, ...]:
        """One data frame of ``length`` bytes."""
        return (self.length,)


@dataclass(frozen=True)
class RdmaAtomic(Message):
    """Requester → agent: an 8-byte atomic (``AtomicOp``) at 8-aligned ``addr`` of ``rkey``.

    Answered by ``atomic_reply``, or ``error`` with REMOTE_ACCESS (unknown
    rkey, outside the MR, no REMOTE_ATOMIC), EINVAL (unaligned), EPERM, EFAULT.
    """

    TYPE: ClassVar[str] = "rdma_atomic"
    rkey: int = wire(Kind.UINT)
    addr: int = wire(Kind.UINT)
    op: int = wire(Kind.UINT, 1)
    compare_add: int = wire(Kind.UINT)
    swap: int = wire(Kind.UINT, default=0)


@dataclass(frozen=True)
class StatMr(Message):
    """Authenticated requester → agent: list its MRs and their ODP counters.

    Answered by ``stat_mr_reply`` with the MRs granted to the requester (none
    for a requester without a grant), or ``error`` PERMISSION_DENIED for an
    unauthenticated one (a plain-TCP ``insecure`` listener's peers).
    """

    TYPE: ClassVar[str] = "stat_mr"


@dataclass(frozen=True)
class StatMrReply(Message):
    """Agent → requester: ``device`` and one row per MR, flattened into ``rows``.

    Each row has the ``STAT_MR_COLUMNS`` in order; ``addr`` and ``length`` are 0
    for an implicit (whole address space) MR, whose ``access`` has ON_DEMAND.
    Counter units are those of ``rdma stat mr``: pages, except the two
    ``*_handled`` counters, which count events.
    """

    TYPE: ClassVar[str] = "stat_mr_reply"
    device: str = wire(Kind.STR, NAME_MAX)
    rows: tuple[int, ...] = wire(Kind.UINTS, 4096 * len(STAT_MR_COLUMNS))
