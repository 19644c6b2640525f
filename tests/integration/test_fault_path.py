"""The FAULT path end to end, on what its speed rests on: a real hmmd, puppet and agent.

A fault of a large range walks the pagemap piece by piece on two threads, asks
PAGEMAP_SCAN about huge pages only where a PMD can be, and gives its arrays to
the mirror's shadow. What the agent installs must still be exactly what
``/proc/PID/pagemap`` says, huge pages with their PMD order; and a fresh mirror's
fault must not pay for hmmd's memory afresh each time (glibc trimming the heap
that the last mirror's arrays were freed into: ``fault.heap``).
"""

from __future__ import annotations

import os

import numpy as np
from hmmirror.client import Access
from hmmirror.daemon.linux import scan
from hmmirror.proto.entries import (
    HMM_PFN_PFN_MASK,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    PMD_ORDER,
    map_order,
    pfns,
)
from hmmirror.testing.pagemap import pagemap

PAGE = 4096
TWO_MIB = 2 << 20
RW = Access.READ | Access.WRITE


def huge_pages(pid: int, addr: int, npages: int) -> np.ndarray:
    """Per page: PMD-mapped, as PAGEMAP_SCAN of the whole range says."""
    out = np.zeros(npages, dtype=np.bool_)
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        for lo, hi in scan.regions(fd, addr, addr + npages * PAGE, scan.PAGE_IS_HUGE):
            out[(lo - addr) // PAGE : (hi - addr) // PAGE] = True
    finally:
        os.close(fd)
    return out


def minor_faults(pid: int) -> int:
    """The process's minor page faults so far (``/proc/PID/stat`` field 10)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[7])


async def test_a_large_fault_installs_the_pagemap_with_huge_pages_marked(hmmd, puppet, agent):
    """A range larger than the walk's split, with a THP in the middle of 4 KiB pages, starting
    inside a 2 MiB block: every entry is the live PFN, VALID and WRITE, and exactly the huge
    pages carry the PMD order."""
    p = puppet
    size = 300 << 20  # 76,800 pages: read on two threads, in pieces, the last one short...
    base = await p.mmap(size + 2 * TWO_MIB, "rw")
    aligned = (base + TWO_MIB - 1) & ~(TWO_MIB - 1)
    await p.madvise(base, size + 2 * TWO_MIB, "nohugepage")
    await p.madvise(aligned + 8 * TWO_MIB, TWO_MIB, "hugepage")
    start = aligned + 5 * PAGE  # ...and not PMD-aligned
    npages = (size - 5 * PAGE) // PAGE
    await p.write(aligned, b"\1" * (size + TWO_MIB))
    async with agent() as s:
        m = await s.mirror(p.pid, start, npages * PAGE, RW)
        assert await m.fault(start, npages) == npages
        raw = pagemap(p.pid, start, npages)
        huge = huge_pages(p.pid, start, npages)
        assert huge.any(), "no THP where MADV_HUGEPAGE asked for one: the test needs one"
        table = m.table
        assert (table & np.uint64(HMM_PFN_VALID | HMM_PFN_WRITE) != 0).all()
        if s.physical_frames:
            assert np.array_equal(pfns(table), raw & np.uint64(HMM_PFN_PFN_MASK))
        assert np.array_equal(map_order(table), np.where(huge, PMD_ORDER, 0).astype(np.uint64))


async def test_fresh_mirrors_fault_in_memory_hmmd_already_has(hmmd, puppet, agent):
    """Register, fault 1 GiB, close, again and again: after the first round, hmmd takes
    almost no page afresh (without fault.heap, 1,536 minor faults a round, 2 ms here: its
    three 2 MiB arrays, given back to the kernel when the last mirror's were freed)."""
    p = puppet
    size = 1024 << 20
    npages = size // PAGE
    addr = await p.mmap(size, "rw")
    pid = hmmd.proc.pid
    async with agent() as s:
        rounds = []
        for _ in range(5):
            m = await s.mirror(p.pid, addr, size, RW)
            before = minor_faults(pid)
            assert await m.fault(addr, npages) == npages
            rounds.append(minor_faults(pid) - before)
            await m.close()
    arrays = 3 * npages * 8 // PAGE
    assert max(rounds[1:]) < arrays // 4, f"hmmd minor faults per fresh fault: {rounds}"
