"""The verbs vocabulary of the mlx5 model: access flags, advice, and the kernel's constants.

Values are libibverbs' own (``IBV_ACCESS_*``, ``IBV_ADVISE_MR_*``), so code
written against verbs reads the same here.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import NamedTuple

from hmmirror.proto.messages import USER_ADDR_END, AtomicOp


class AccessFlags(IntFlag):
    """``ibv_access_flags``: what an MR allows, and how it is backed."""

    LOCAL_WRITE = 1
    REMOTE_WRITE = 2
    REMOTE_READ = 4
    REMOTE_ATOMIC = 8
    ON_DEMAND = 0x40
    """On-Demand Paging: nothing is pinned; the device faults pages in as it touches them."""


#: ``ib_access_writable``: an MR with any of these faults for write (its umem is writable).
WRITABLE = AccessFlags.LOCAL_WRITE | AccessFlags.REMOTE_WRITE | AccessFlags.REMOTE_ATOMIC


class Advice(IntEnum):
    """``ibv_advise_mr`` advice."""

    PREFETCH = 0
    """Fault for read; the MTT gets no WRITE bit even on a writable MR (DOWNGRADE)."""
    PREFETCH_WRITE = 1
    """Fault for write; EPERM on an MR that is not writable."""
    PREFETCH_NO_FAULT = 2
    """Map only the pages already present; fault nothing in (SNAPSHOT)."""


#: ``IBV_ADVISE_MR_FLAG_FLUSH``: prefetch synchronously, in the caller's context.
ADVISE_FLUSH = 1
#: mlx5's ``MAX_PREFETCH_LEN``: how far past a fault of unknown length the device prefetches.
MAX_PREFETCH_LEN = 4 << 20
#: ``mlx5_imr_mtt_shift`` for a 48-bit address space: implicit ODP children are 1 GiB.
IMPLICIT_CHILD_SHIFT = 30
IMPLICIT_CHILD_SIZE = 1 << IMPLICIT_CHILD_SHIFT
#: The length that, with address 0 and ON_DEMAND, asks for an implicit MR (``SIZE_MAX``).
WHOLE_ADDRESS_SPACE = (1 << 64) - 1
#: Where an implicit MR's address space ends (user space on x86-64, 4-level paging).
IMPLICIT_END = USER_ADDR_END


class Sge(NamedTuple):
    """One scatter/gather entry in ``struct ibv_sge``'s order: address, length, lkey."""

    addr: int
    length: int
    lkey: int


__all__ = [
    "ADVISE_FLUSH",
    "IMPLICIT_CHILD_SHIFT",
    "IMPLICIT_CHILD_SIZE",
    "IMPLICIT_END",
    "MAX_PREFETCH_LEN",
    "WHOLE_ADDRESS_SPACE",
    "WRITABLE",
    "AccessFlags",
    "Advice",
    "AtomicOp",
    "Sge",
]
