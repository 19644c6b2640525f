"""The proc watcher's ``detect`` over several mirrors of one mm finds what each would alone.

``detect`` reads the pagemap (and walks the VMAs) of the union of the mirrors'
held ranges once, rather than once per mirror, and judges each mirror's shadow
against its part of that read. What it reports must be what judging each mirror
by itself reports, merged: the same ranges with the same events. The mm is this
very process; the region is really mapped, and really changed with madvise,
mprotect and munmap, between the hand-outs and the poll.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator

import numpy as np
import pytest
from hmmirror.daemon.linux.procfs import PAGE_SHIFT, PAGE_SIZE, ProcessView, start_time
from hmmirror.daemon.state import Mirror, Mm, Session, Span
from hmmirror.daemon.watch.proc import detect, merge
from hmmirror.proto.entries import HMM_PFN_PFN_MASK, HMM_PFN_VALID, HMM_PFN_WRITE
from hmmirror.proto.messages import Access, Event

PAGES = 64
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]  # fmt: skip
for _name in ("munmap", "madvise", "mprotect"):
    getattr(_libc, _name).argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int][
        : 2 if _name == "munmap" else 3
    ]
MADV_DONTNEED = 4


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


@pytest.fixture
def region() -> Iterator[int]:
    """PAGES anonymous pages of this process, every one written (so present)."""
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    addr = _libc.mmap(None, PAGES * PAGE_SIZE, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    ctypes.memset(addr, 0x5A, PAGES * PAGE_SIZE)
    try:
        yield addr
    finally:
        _libc.munmap(addr, PAGES * PAGE_SIZE)


def page(addr: int, i: int) -> int:
    return addr + (i << PAGE_SHIFT)


def test_several_mirrors_find_what_each_finds_alone(region: int) -> None:
    pid = os.getpid()
    view = ProcessView(pid)
    try:
        raw = view.pagemap(region, PAGES)
        assert np.all(raw & np.uint64(1 << 63)), "every page of the region is present"
        entries = (raw & np.uint64(HMM_PFN_PFN_MASK)) | np.uint64(HMM_PFN_VALID | HMM_PFN_WRITE)
        # Overlapping, nested and disjoint layouts, one of them in two spans.
        layouts = [[(0, 32)], [(16, 48)], [(40, 64)], [(0, 64)], [(0, 8), (56, 64)], [(20, 22)]]
        mirrors: list[Mirror] = []
        for k, layout in enumerate(layouts, 1):
            session = Session(id=k, identity=b"s%d" % k, name=f"agent-{k}", last_seen=0.0)
            spans = [Span(page(region, a), page(region, b)) for a, b in layout]
            for span, (a, b) in zip(spans, layout, strict=True):
                span.hand_out(span.start, entries[a:b].copy(), raw[a:b].copy())
            mirrors.append(Mirror(k, session, None, spans, Access.WRITE))  # type: ignore[arg-type]

        def mm_of(which: list[Mirror]) -> Mm:
            mm = Mm(pid=pid, start_time=start_time(pid), view=view, pidfd=-1)
            mm.mirrors.extend(which)
            return mm

        _check(_libc.madvise(page(region, 10), 3 * PAGE_SIZE, MADV_DONTNEED), "madvise")
        _check(_libc.mprotect(page(region, 20), 2 * PAGE_SIZE, mmap.PROT_READ), "mprotect")
        _check(_libc.munmap(page(region, 44), 3 * PAGE_SIZE), "munmap")
        _check(_libc.madvise(page(region, 60), PAGE_SIZE, MADV_DONTNEED), "madvise")

        together = detect(mm_of(mirrors), 0)
        alone = merge([change for m in mirrors for change in detect(mm_of([m]), 0)])
        assert together == alone
        assert together == [  # merge's order: by event, then address
            (page(region, 44), page(region, 47), Event.UNMAP),
            (page(region, 10), page(region, 13), Event.CLEAR),
            (page(region, 60), page(region, 61), Event.CLEAR),
            (page(region, 20), page(region, 22), Event.PROTECTION_VMA),
        ]
    finally:
        view.close()
