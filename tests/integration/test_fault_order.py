"""Two faults of one page whose replies leave hmmd in the other order than their walks.

A POPULATE fault that also reads its pages (``read``, SPEC §4.3) is recorded in
the mirror's shadow at once and answered only when its copy is done; a fault
behind it is answered at once. The agent installs the replies in the order they
arrive, so it may end up holding the first fault's entries while hmmd last
recorded the second's. hmmd's shadow must still name everything the agent may
hold: it judges every later change that raises no userfaultfd event (an
mprotect) against it, and nothing else would invalidate what it does not know.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from hmmirror.client import Access, Event
from hmmirror.proto.entries import HMM_PFN_VALID, HMM_PFN_WRITE

PAGE = 4096


async def test_a_write_entry_answered_last_is_still_invalidated_by_an_mprotect(hmmd, puppet, agent):
    async with agent() as s:
        addr = await puppet.mmap(4 * PAGE)
        await puppet.read(addr, 4 * PAGE)  # every page the shared zero page
        m = await s.mirror(puppet.pid, addr, 4 * PAGE, Access.READ | Access.WRITE)
        valid_write = np.uint64(HMM_PFN_VALID | HMM_PFN_WRITE)
        for _ in range(20):
            # A: a write fault of page 0 that reads it in the same trip (its reply waits for
            # the copy); B: a read fault of it, answered at once, after A's walk.
            await asyncio.gather(m.populate_read(addr, 1, True), m.populate(addr, 1, False))
            if int(m.table[0]) & int(valid_write) == int(valid_write):
                break  # A's WRITE entry was installed last: the case under test
        else:
            raise AssertionError("the write fault's reply never arrived last in 20 tries")
        await puppet.mprotect(addr, 4 * PAGE, "r")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and int(m.table[0]) & int(HMM_PFN_WRITE):
            await asyncio.sleep(0.02)
        assert not int(m.table[0]) & int(HMM_PFN_WRITE), (
            "the agent still holds a WRITE entry in a read-only VMA 10 s after the mprotect; "
            f"events seen: {m.events}"
        )
        assert any(e == Event.PROTECTION_VMA for _, _, e in m.events)
