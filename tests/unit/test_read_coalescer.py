"""``ReadCoalescer`` on byte ranges: each read gets exactly its bytes from the run's pages.

hm-agent's READs without a task (``Mirror.read_now``) hand the coalescer byte
ranges at any offset, and ask for a read without company to be sent as a run of
its own (``alone``). The coalescer runs on a real event loop here; its two
functions stand for the mirror: ``entries`` gives a table slice (VALID unless a
page is listed as missing) and ``read_run`` returns the pages' bytes from a
pattern, recording each run it was asked for.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hmmirror.client._reads import ReadCoalescer
from hmmirror.client._table import VALID
from hmmirror.proto.entries import PAGE_SIZE, Entries

BASE = 0x10_0000
NPAGES = 32
#: Byte i of the mapping: a read of the wrong offset shows.
MEMORY = bytes((i * 7 + i // PAGE_SIZE) & 0xFF for i in range(NPAGES * PAGE_SIZE))


class FakeMirror:
    """The two functions a coalescer needs, over ``MEMORY`` at ``BASE``."""

    def __init__(self, missing: tuple[int, ...] = (), refuse: bool = False) -> None:
        self.missing = set(missing)
        self.refuse = refuse
        self.runs: list[tuple[int, int]] = []

    def entries(self, lo: int, hi: int) -> Entries:
        assert lo % PAGE_SIZE == 0 and hi % PAGE_SIZE == 0, (hex(lo), hex(hi))
        pages = range((lo - BASE) // PAGE_SIZE, (hi - BASE) // PAGE_SIZE)
        return np.array([0 if p in self.missing else VALID | p for p in pages], dtype=np.uint64)

    async def read_run(self, start: int, entries: Entries) -> memoryview:
        assert start % PAGE_SIZE == 0 and bool((entries >= VALID).all())
        self.runs.append((start, len(entries)))
        await asyncio.sleep(0)
        if self.refuse:
            raise RuntimeError("refused: stale")
        off = start - BASE
        return memoryview(MEMORY[off : off + len(entries) * PAGE_SIZE])


def coalescer(mirror: FakeMirror, max_pages: int = 16) -> ReadCoalescer:
    return ReadCoalescer(mirror.entries, mirror.read_run, lambda: max_pages)


def want(addr: int, length: int) -> bytes:
    return MEMORY[addr - BASE : addr - BASE + length]


async def test_unaligned_reads_of_one_turn_share_a_run_and_get_their_own_bytes():
    mirror = FakeMirror()
    reads = coalescer(mirror)
    asks = [(BASE + 5, 3000), (BASE + 4090, 20), (BASE + 3 * PAGE_SIZE + 100, 4096), (BASE, 1)]
    got = await asyncio.gather(*(reads.read(a, n, alone=True) for a, n in asks))
    for (a, n), data in zip(asks, got, strict=True):
        assert data is not None and bytes(data) == want(a, n), hex(a)
    assert mirror.runs == [(BASE, 5)], "one run over pages 0-4 (the last read ends in page 4)"


async def test_a_read_asked_alone_goes_as_a_run_of_its_own_pages():
    mirror = FakeMirror()
    reads = coalescer(mirror)
    addr = BASE + 2 * PAGE_SIZE - 10  # across the boundary of pages 1 and 2
    got = await reads.read(addr, 30, alone=True)
    assert got is not None and bytes(got) == want(addr, 30)
    assert mirror.runs == [(BASE + PAGE_SIZE, 2)]


async def test_a_read_without_company_not_asked_alone_is_left_to_its_caller():
    mirror = FakeMirror()
    assert await coalescer(mirror).read(BASE, PAGE_SIZE) is None
    assert mirror.runs == []


async def test_a_run_never_exceeds_max_pages_counting_the_pages_its_ends_touch():
    """Reads ending and starting mid-page: pages 1-4 make 4 pages, adding page 5 makes 5."""
    mirror = FakeMirror()
    reads = coalescer(mirror, max_pages=4)
    asks = [(BASE + PAGE_SIZE + 10, 10), (BASE + 4 * PAGE_SIZE + 5, 10), (BASE + 5 * PAGE_SIZE, 8)]
    got = await asyncio.gather(*(reads.read(a, n, alone=True) for a, n in asks))
    for (a, n), data in zip(asks, got, strict=True):
        assert data is not None and bytes(data) == want(a, n)
    assert mirror.runs == [(BASE + PAGE_SIZE, 4), (BASE + 5 * PAGE_SIZE, 1)]


@pytest.mark.parametrize("why", ["a page of the run is missing", "the run is refused"])
async def test_every_read_of_a_run_that_cannot_go_is_told_to_go_alone(why):
    refuse = why == "the run is refused"
    mirror = FakeMirror(missing=() if refuse else (1,), refuse=refuse)
    reads = coalescer(mirror)
    got = await asyncio.gather(
        reads.read(BASE + 10, 100, alone=True), reads.read(BASE + 2 * PAGE_SIZE, 100, alone=True)
    )
    assert got == [None, None]
    assert mirror.runs == ([(BASE, 3)] if refuse else [])


async def test_no_read_keeps_more_than_twice_its_bytes_of_the_run_alive():
    """Replies go out zero-copy, and a reply cap counts a reply's bytes: a slice of a run
    pinned the whole run (4 MiB for a read of 64 KiB beside a few bytes), so a requester that
    never read its replies held far more than its cap. A read under half the run gets a copy."""

    class FreshBuffers(FakeMirror):
        async def read_run(self, start: int, entries: Entries) -> memoryview:
            data = await super().read_run(start, entries)
            return memoryview(bytearray(data))  # a buffer of its own, as hmmd's reply is

    reads = coalescer(FreshBuffers())
    asks = [(BASE + 10, 8), (BASE + 2 * PAGE_SIZE, 8 * PAGE_SIZE), (BASE + 15 * PAGE_SIZE, 8)]
    got = await asyncio.gather(*(reads.read(a, n, alone=True) for a, n in asks))
    for (a, n), data in zip(asks, got, strict=True):
        assert data is not None and bytes(data) == want(a, n)
        pinned = len(data.obj)  # type: ignore[arg-type]
        assert pinned <= 2 * n, f"a read of {n} bytes keeps {pinned} bytes alive"
    whole = await asyncio.gather(reads.read(BASE, 3 * PAGE_SIZE), reads.read(BASE + 5, 9))
    assert whole[0] is not None and len(whole[0].obj) == 3 * PAGE_SIZE  # type: ignore[arg-type]
