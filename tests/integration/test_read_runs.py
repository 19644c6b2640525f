"""Concurrent small reads of one mirror go to hmmd as one ``dma_read`` of the run covering
them (``client/_reads.py``), and each still gets exactly its own bytes.

A real hmmd, a real puppet target and a real agent session. hmmd's ``dma_reads``
counter says how many reads it served: fewer than the reads made when they ran
together; as many when a page between them holds no translation (no run may
read it), or when the reads come one at a time.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hmmirror.client import Access
from hmmirror.testing.pagemap import PM_PFN, pagemap

PAGE = 4096


def _pattern(npages: int) -> bytes:
    """Page i filled with byte i + 1: a read of the wrong page shows."""
    return b"".join(bytes([i + 1]) * PAGE for i in range(npages))


async def _mirrored(puppet: Any, session: Any, npages: int) -> tuple[int, Any]:
    """A mapping of ``npages`` holding ``_pattern``, and a read mirror of it."""
    addr = await puppet.mmap(npages * PAGE)
    await puppet.write(addr, _pattern(npages))
    return addr, await session.mirror(puppet.pid, addr, npages * PAGE, Access.READ)


async def _read_pages(session: Any, m: Any, addr: int, pages: list[int]) -> tuple[list[Any], Any]:
    """Read each page of ``pages`` alone, all at once; the results and hmmd's status after,
    with its counters as deltas from before."""
    before = await session.status()
    got = await asyncio.gather(*(m.read(addr + i * PAGE, 1) for i in pages))
    after = await session.status()
    return got, {k: after[k] - before[k] for k in ("dma_reads", "stale")}


def _assert_pages(pages: list[int], got: list[Any], want: bytes) -> None:
    for i, result in zip(pages, got, strict=True):
        assert result.data == want[i * PAGE : (i + 1) * PAGE], f"page {i} read wrong bytes"


async def test_concurrent_reads_of_neighbouring_pages_share_one_dma_read(hmmd, puppet, agent):
    n = 16
    async with agent() as s:
        addr, m = await _mirrored(puppet, s, n)
        await m.fault(addr, n, write=False)
        order = [5, 0, 15, 3, 9, 1, 12, 7, 2, 14, 4, 11, 6, 13, 8, 10]
        got, delta = await _read_pages(s, m, addr, order)
        _assert_pages(order, got, _pattern(n))
        assert all(r.faults == 0 for r in got)
        assert delta["dma_reads"] == 1, f"16 reads of one turn took {delta['dma_reads']} dma_reads"


async def test_reads_around_an_untranslated_page_are_not_joined_across_it(hmmd, puppet, agent):
    """Pages 0-2 and 4-6 are translated, page 3 is not: a run over 0-6 would name page 3,
    so each read goes alone, and each returns its own page."""
    async with agent() as s:
        addr, m = await _mirrored(puppet, s, 7)
        await m.fault(addr, 3, write=False)
        await m.fault(addr + 4 * PAGE, 3, write=False)
        pages = [0, 1, 2, 4, 5, 6]
        got, delta = await _read_pages(s, m, addr, pages)
        _assert_pages(pages, got, _pattern(7))
        assert delta["dma_reads"] == len(pages), f"{delta['dma_reads']} dma_reads for 6 reads"


# hmmd sees the target's change only at the DMA's own check: no userfaultfd, a slow poll.
@pytest.mark.hmmd_args("--uffd", "off", "--poll-interval", "30s", "--poll-max", "30s")
async def test_a_run_refused_stale_falls_back_and_every_read_gets_the_new_bytes(
    hmmd, puppet, agent
):
    """The target rewrites one page of the run in a new frame (MADV_DONTNEED, then a write)
    after the agent translated it: hmmd refuses the run STALE (its entries name the old
    frame), each read then goes alone, and each returns the page's bytes as they are now,
    the rewritten one through a fresh fault.

    The case is made again on a new mapping (at most five times) where the rewritten page
    came in the very frame it had (the kernel hands a freed frame out again first: then the
    entries are still right, and nothing is refused; CI caught it twice), or where the proc
    watcher's first look at the new mm saw the change before the reads."""
    n = 8
    want = bytearray(_pattern(n))
    want[3 * PAGE : 4 * PAGE] = b"\xee" * PAGE
    async with agent() as s:
        for _ in range(5):
            addr, m = await _mirrored(puppet, s, n)
            await m.fault(addr, n, write=False)
            frame = int(pagemap(puppet.pid, addr + 3 * PAGE, 1)[0]) & PM_PFN
            await puppet.madvise(addr + 3 * PAGE, PAGE, "dontneed")
            await puppet.write(addr + 3 * PAGE, b"\xee" * PAGE)
            moved = int(pagemap(puppet.pid, addr + 3 * PAGE, 1)[0]) & PM_PFN != frame
            seen_first = bool(m.events)
            got, delta = await _read_pages(s, m, addr, list(range(n)))
            _assert_pages(list(range(n)), got, bytes(want))
            if moved and not seen_first:
                break
            await m.close()
        else:
            raise AssertionError("page 3 never came in a new frame unseen, in five tries")
        assert delta["stale"] >= 2, "the run and page 3 alone were refused"
        assert got[3].faults == 1 and all(r.faults == 0 for i, r in enumerate(got) if i != 3)


async def test_reads_one_at_a_time_each_take_their_own_dma_read(hmmd, puppet, agent):
    n = 4
    async with agent() as s:
        addr, m = await _mirrored(puppet, s, n)
        await m.fault(addr, n, write=False)
        before = (await s.status())["dma_reads"]
        for i in range(n):
            assert (await m.read(addr + i * PAGE, 1)).data == _pattern(n)[i * PAGE : (i + 1) * PAGE]
        assert (await s.status())["dma_reads"] - before == n
