"""Strict writes: a write to a page a strict mirror holds waits for that mirror's ack.

The one user-space path where the invalidation truly comes before the change.
The target is a puppet that exposed both its userfaultfds; the agent holds its
ACK by keeping a DMA on the page in flight, which is how the test makes the
target's write wait, and then makes the agent dead.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from hmmirror.client import Access, Event, RemoteError

PAGE = 4096


async def strict_mirror(hmmd, puppet, agent_session):
    await puppet.expose(hmmd.endpoint)
    await puppet.expose(hmmd.endpoint, strict=True)
    addr = await puppet.mmap(2 * PAGE)
    await puppet.write(addr, b"old!" * (2 * PAGE // 4))
    mirror = await agent_session.mirror(puppet.pid, addr, 2 * PAGE, Access.READ, strict_writes=True)
    await mirror.fault(addr, 2)
    return addr, mirror


async def test_no_agent_reads_the_old_data_once_the_write_is_visible(hold_dma, hmmd, puppet, agent):
    async with agent() as s:
        addr, mirror = await strict_mirror(hmmd, puppet, s)
        seen_at: dict[str, float] = {}
        original = mirror._invalidate

        def stamp(seq, start, end, event):
            if event == Event.WRITTEN:
                seen_at.setdefault("written", time.monotonic())
            return original(seq, start, end, event)

        mirror._invalidate = stamp
        entered, release = hold_dma(mirror)
        reading = asyncio.ensure_future(mirror.read(addr, 1))
        await asyncio.wait_for(entered.wait(), 5)
        writing = asyncio.ensure_future(puppet.write(addr + 8, b"NEW!"))
        await asyncio.sleep(0.4)
        assert not writing.done(), "the write landed before the mirror acked"
        assert "written" in seen_at and mirror.table[0] == 0
        release.set()
        await asyncio.wait_for(writing, 5)
        visible_at = time.monotonic()
        assert (await reading).data[:8] == b"old!old!"  # the held DMA read before the write
        assert seen_at["written"] < visible_at
        # From now on the old contents are unreachable: the translation was zapped before
        # the write, and what the mirror reads is the new data.
        assert mirror.table[0] == 0
        assert (await mirror.read(addr, 1)).data[:12] == b"old!old!NEW!"
        st = await s.status()
        assert st["strict_write_faults"] >= 1


async def test_a_dead_strict_agent_blocks_a_write_only_until_its_deadline(
    hold_dma, hmmd, puppet, agent
):
    async with agent(name="dead-device") as s:
        addr, mirror = await strict_mirror(hmmd, puppet, s)
        entered, release = hold_dma(mirror)
        reading = asyncio.ensure_future(mirror.read(addr, 1))
        await asyncio.wait_for(entered.wait(), 5)
        t0 = time.monotonic()
        await asyncio.wait_for(puppet.write(addr, b"x"), 10)
        took = time.monotonic() - t0
        assert 0.9 <= took < 5, f"the write waited {took:.2f} s (the ack deadline is 1 s)"
        assert (await s.status())["evictions"] >= 1
        release.set()
        await asyncio.gather(reading, return_exceptions=True)


async def test_strict_writes_need_a_second_userfaultfd(hmmd, puppet, agent):
    await puppet.expose(hmmd.endpoint)  # only the first one
    addr = await puppet.mmap(PAGE)
    async with agent() as s:
        with pytest.raises(RemoteError) as info:
            await s.mirror(puppet.pid, addr, PAGE, Access.READ, strict_writes=True)
        assert "expose(strict=True)" in str(info.value)
