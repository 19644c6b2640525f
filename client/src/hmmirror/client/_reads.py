"""Concurrent small reads of one mirror, coalesced into one ``dma_read`` per turn of the loop.

Each plain ``dma_read`` costs a message each way and a trip through hmmd's loop and copy
thread, whatever its size: at 4 KiB that per-message cost is nearly all of it. Reads
issued in the same turn of the event loop (the requests one drain of an RDMA listener
delivered, say) whose pages lie close together are sent as one ``dma_read`` of the run
that covers them, when every page of that run, the gaps between them included, holds
a VALID translation now, and the run fits ``max_dma_pages``. Each read then gets its
own slice of the reply (a copy, if under half of it: replies go out zero-copy, and
what a reply pins must stay near what the requester's reply cap counts). A refusal
(STALE, say) reaches every read of the run, and each starts over as it would have alone.

A read asked for with ``alone=True`` is sent even without company, as a run of its
own pages: its caller (``Mirror.read_now``) has no slower path of its own to take it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from hmmirror.client._table import VALID
from hmmirror.proto.entries import PAGE_SHIFT, PAGE_SIZE, Entries

#: The table's entries for the pages [lo, hi), copied.
EntriesFn = Callable[[int, int], Entries]
#: One ``dma_read`` from ``start`` with ``entries`` (one per page); the data read.
ReadFn = Callable[[int, Entries], Awaitable[memoryview]]

#: Pages a run may read beyond the reads it serves (the gaps between them).
MAX_GAP_PAGES = 8

_PAGE_MASK = PAGE_SIZE - 1


class _Read:
    """One read of the bytes [start, end) waiting for this turn's flush."""

    __slots__ = ("alone", "end", "future", "start")

    def __init__(
        self, start: int, end: int, future: asyncio.Future[memoryview | None], alone: bool
    ) -> None:
        self.start = start
        self.end = end
        self.future = future
        #: Sent as a run of its own when it has no company.
        self.alone = alone


class ReadCoalescer:
    """One mirror's reads of this turn, sent together at its end."""

    def __init__(self, entries: EntriesFn, read_run: ReadFn, max_pages: Callable[[], int]) -> None:
        self._entries = entries
        self._read_run = read_run
        self._max_pages = max_pages
        self.loop = asyncio.get_running_loop()
        self._queued: list[_Read] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def read(
        self, start: int, length: int, alone: bool = False
    ) -> asyncio.Future[memoryview | None]:
        """The bytes [start, +length) as one view, read as part of a run; None when no
        run took the read (it was alone, or its run was refused): the caller reads alone.
        With ``alone`` a read without company is sent as a run of its own pages."""
        future: asyncio.Future[memoryview | None] = self.loop.create_future()
        if not self._queued:
            self.loop.call_soon(self._flush)
        self._queued.append(_Read(start, start + length, future, alone))
        return future

    def _flush(self) -> None:
        """Group this turn's reads into runs and send each run of two or more (or of one
        read asked for ``alone``)."""
        queued, self._queued = self._queued, []
        if len(queued) == 1:
            self._send_run(queued, queued[0].start, queued[0].end)
            return
        queued.sort(key=lambda r: r.start)
        limit = self._max_pages() << PAGE_SHIFT
        gap = MAX_GAP_PAGES << PAGE_SHIFT
        group = [queued[0]]
        lo, hi = queued[0].start, queued[0].end
        for read in queued[1:]:
            new_hi = max(hi, read.end)
            span = ((new_hi + _PAGE_MASK) & ~_PAGE_MASK) - (lo & ~_PAGE_MASK)
            if read.start - hi <= gap and span <= limit:
                group.append(read)
                hi = new_hi
                continue
            self._send_run(group, lo, hi)
            group, lo, hi = [read], read.start, read.end
        self._send_run(group, lo, hi)

    def _send_run(self, group: list[_Read], lo: int, hi: int) -> None:
        """Send ``group`` as one read of the pages over [lo, hi) if it has company (or asked
        to go ``alone``) and every page of the run holds a VALID translation now; else each
        read goes alone."""
        if len(group) < 2 and not group[0].alone:
            _alone(group)
            return
        lo &= ~_PAGE_MASK
        hi = (hi + _PAGE_MASK) & ~_PAGE_MASK
        entries = self._entries(lo, hi)
        if not bool((entries >= VALID).all()):
            _alone(group)
            return
        task = self.loop.create_task(self._run(group, lo, entries))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, group: list[_Read], start: int, entries: Entries) -> None:
        """One ``dma_read`` for ``group``; each read gets its slice. Refused, or failed in
        any way, each read goes alone and gets the answer it would have had by itself."""
        try:
            data = await self._read_run(start, entries)
        except Exception:
            _alone(group)
            return
        except BaseException:
            _alone(group)
            raise
        for read in group:
            if not read.future.done():
                piece = data[read.start - start : read.end - start]
                if 2 * len(piece) < len(data):
                    # A copy: a slice would keep the whole run alive as long as the read's
                    # reply waits to be sent (zero-copy), while its requester's reply cap
                    # counts only the slice; a never-reading requester could pin run after
                    # run. A slice of half the run or more pins at most twice its size.
                    piece = memoryview(bytes(piece))
                read.future.set_result(piece)


def _alone(group: list[_Read]) -> None:
    """Tell each read of ``group`` to go alone."""
    for read in group:
        if not read.future.done():
            read.future.set_result(None)
