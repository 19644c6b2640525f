"""The enumerations and flag sets message fields carry as integers."""

from __future__ import annotations

from enum import IntEnum, IntFlag


class Access(IntFlag):
    """What a mirror may do to the target's memory."""

    READ = 1
    WRITE = 2


class Event(IntEnum):
    """Why a range is invalidated: ``mmu_notifier_event`` values, plus EVICT."""

    UNMAP = 0
    CLEAR = 1
    PROTECTION_VMA = 2
    PROTECTION_PAGE = 3
    SOFT_DIRTY = 4
    RELEASE = 5
    MIGRATE = 6
    EXCLUSIVE = 7
    EVICT = 8
    WRITTEN = 9
    """The target wrote these pages (written-page tracking; only subscribed mirrors get it)."""


class FaultMode(IntEnum):
    """How FAULT treats pages that are not present."""

    SNAPSHOT = 0
    """Report what is there; fault nothing in (``default_flags = 0``)."""
    POPULATE = 1
    """Fault missing pages in first (``HMM_PFN_REQ_FAULT``)."""
    PRESENT = 2
    """Map the pages already present, faulting nothing in: what SNAPSHOT reports, but
    handed out like POPULATE's entries, so the agent may install them (mlx5's
    ``MLX5_PF_FLAGS_SNAPSHOT``, used by PREFETCH_NO_FAULT and ODP registration)."""


class AtomicOp(IntEnum):
    """An 8-byte device atomic (``IBV_WR_ATOMIC_*``)."""

    CMP_SWAP = 0
    """If the value equals ``compare_add``, store ``swap``; return the old value."""
    FETCH_ADD = 1
    """Add ``compare_add`` modulo 2^64; return the old value."""
