"""Page-entry encoding: the kernel's ``hmm_pfn`` u64 layout and dmirror's PROT bytes.

One u64 per 4 KiB page, little-endian on the wire::

    bit 63      HMM_PFN_VALID    the entry maps a page
    bit 62      HMM_PFN_WRITE    the device may write through it
    bit 61      HMM_PFN_ERROR    the page cannot be mapped (snapshot of a bad VMA)
    bits 53..57 map order        0 for 4 KiB, 9 for a 2 MiB PMD, 18 for a 1 GiB PUD
    bits 0..52  PFN              0 when the daemon cannot see PFNs

``prot_bytes`` turns entries into the bytes ``HMM_DMIRROR_SNAPSHOT`` returns,
following ``dmirror_mkentry``.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT

HMM_PFN_VALID: Final = 1 << 63
HMM_PFN_WRITE: Final = 1 << 62
HMM_PFN_ERROR: Final = 1 << 61
HMM_PFN_ORDER_SHIFT: Final = 53
HMM_PFN_ORDER_MASK: Final = 0x1F << HMM_PFN_ORDER_SHIFT
HMM_PFN_PFN_MASK: Final = (1 << HMM_PFN_ORDER_SHIFT) - 1
HMM_PFN_FLAGS: Final = HMM_PFN_VALID | HMM_PFN_WRITE | HMM_PFN_ERROR

PMD_ORDER: Final = 9
PUD_ORDER: Final = 18

# dmirror's snapshot bytes (lib/test_hmm_uapi.h).
HMM_DMIRROR_PROT_ERROR: Final = 0xFF
HMM_DMIRROR_PROT_NONE: Final = 0x00
HMM_DMIRROR_PROT_READ: Final = 0x01
HMM_DMIRROR_PROT_WRITE: Final = 0x02
HMM_DMIRROR_PROT_PMD: Final = 0x04
HMM_DMIRROR_PROT_PUD: Final = 0x08
HMM_DMIRROR_PROT_ZERO: Final = 0x10
HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL: Final = 0x20
HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE: Final = 0x30
HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL: Final = 0x40
HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE: Final = 0x50

Entries = npt.NDArray[np.uint64]
"""A device page table, or a slice of one: one ``hmm_pfn`` per page."""


def map_order(entries: Entries) -> npt.NDArray[np.uint64]:
    """Return the map order of every entry (``hmm_pfn_to_map_order``)."""
    return (entries & np.uint64(HMM_PFN_ORDER_MASK)) >> np.uint64(HMM_PFN_ORDER_SHIFT)


def pfns(entries: Entries) -> npt.NDArray[np.uint64]:
    """Return the PFN field of every entry."""
    return entries & np.uint64(HMM_PFN_PFN_MASK)


def prot_bytes(entries: Entries, zero_pfn: int) -> npt.NDArray[np.uint8]:
    """Return dmirror's snapshot byte for each entry.

    ``zero_pfn`` is the PFN of the kernel's shared zero page, which the daemon
    announces at ``welcome``; 0 means unknown, and then no page reads as ZERO.
    """
    e = np.asarray(entries, dtype=np.uint64)
    out = np.zeros(e.shape, dtype=np.uint8)
    valid = (e & np.uint64(HMM_PFN_VALID)) != 0
    write = (e & np.uint64(HMM_PFN_WRITE)) != 0
    out[valid] = np.where(write[valid], HMM_DMIRROR_PROT_WRITE, HMM_DMIRROR_PROT_READ)
    if zero_pfn:
        out[valid & (pfns(e) == np.uint64(zero_pfn))] |= HMM_DMIRROR_PROT_ZERO
    order = map_order(e)
    out[valid & (order == PMD_ORDER)] |= HMM_DMIRROR_PROT_PMD
    out[valid & (order == PUD_ORDER)] |= HMM_DMIRROR_PROT_PUD
    out[(e & np.uint64(HMM_PFN_ERROR)) != 0] = HMM_DMIRROR_PROT_ERROR
    return out


def to_wire(entries: Entries) -> bytes:
    """Encode entries as the little-endian u64 frame the protocol carries."""
    return np.ascontiguousarray(entries, dtype="<u8").tobytes()


def from_wire(frame: bytes | memoryview, npages: int) -> Entries:
    """Decode a page-entry frame, checking its length first (never trust the peer)."""
    if len(frame) != npages * 8:
        from hmmirror.proto.errors import DecodeError

        raise DecodeError(f"entry frame has {len(frame)} bytes, expected {npages * 8}")
    return np.frombuffer(frame, dtype="<u8").astype(np.uint64, copy=False)
