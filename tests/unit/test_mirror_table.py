"""An agent's page table (``MirrorTable``) against INVALIDATE items an hmmd may send.

The items of one INVALIDATE may overlap the same in-flight DMAs many times over (a target
that announces its mirrored range 4096 times in one ``sync_range``): the ACK waits for
each DMA once, not once per item.
"""

from __future__ import annotations

import asyncio

import numpy as np
from hmmirror.client._table import VALID, MirrorTable
from hmmirror.proto.messages import Access, Event

PAGE = 4096
BASE = 0x7F0000000000


async def test_items_overlapping_the_same_dmas_wait_for_each_dma_once() -> None:
    table = MirrorTable(1, 1234, BASE, 16 * PAGE, Access.READ)
    loop = asyncio.get_running_loop()
    dmas = [loop.create_future() for _ in range(8)]
    table._inflight.extend((BASE + i * PAGE, BASE + (i + 1) * PAGE, f) for i, f in enumerate(dmas))
    items = tuple((7, BASE, BASE + 16 * PAGE, int(Event.CLEAR)) for _ in range(4096))
    fences = table._invalidate_items(items)
    assert len(fences) == len(dmas), f"{len(fences)} fences for {len(dmas)} DMAs in flight"
    assert set(fences) == set(dmas)
    for f in dmas:
        f.set_result(None)


async def test_many_release_items_clear_the_table_once() -> None:
    table = MirrorTable(1, 1234, BASE, 4 * PAGE, Access.READ)
    table.table[:] = VALID
    table._held = 4
    items = tuple((9, BASE, BASE + 4 * PAGE, int(Event.RELEASE)) for _ in range(64))
    assert table._invalidate_items(items) == []
    assert table.released and table.held == 0
    assert not np.count_nonzero(table.table)
