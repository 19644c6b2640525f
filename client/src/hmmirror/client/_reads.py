"""Concurrent small reads of one mirror, coalesced into one ``dma_read`` per turn of the loop.

Each plain ``dma_read`` costs a message each way and a trip through hmmd's loop and copy
thread, whatever its size: at 4 KiB that per-message cost is nearly all of it. Reads
issued in the same turn of the event loop (the requests one drain of an RDMA listener
delivered, say) whose pages lie close together are sent as one ``dma_read`` of the run
that covers them, when every page of that run, the gaps between them included, holds
a VALID translation now, and the run fits ``max_dma_pages``. Each read then gets its
own slice of the reply. A refusal (STALE, say) reaches every read of the run, and
each starts over as it would have alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from hmmirror.client._table import VALID
from hmmirror.proto.entries import PAGE_SHIFT, Entries

#: The table's entries for the pages [lo, hi), copied.
EntriesFn = Callable[[int, int], Entries]
#: One ``dma_read`` from ``start`` with ``entries`` (one per page); the data read.
ReadFn = Callable[[int, Entries], Awaitable[memoryview]]

#: Pages a run may read beyond the reads it serves (the gaps between them).
MAX_GAP_PAGES = 8


class _Read:
    """One read waiting for this turn's flush."""

    __slots__ = ("end", "future", "start")

    def __init__(self, start: int, end: int, future: asyncio.Future[memoryview | None]) -> None:
        self.start = start
        self.end = end
        self.future = future


class ReadCoalescer:
    """One mirror's reads of this turn, sent together at its end."""

    def __init__(self, entries: EntriesFn, read_run: ReadFn, max_pages: Callable[[], int]) -> None:
        self._entries = entries
        self._read_run = read_run
        self._max_pages = max_pages
        self.loop = asyncio.get_running_loop()
        self._queued: list[_Read] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def read(self, start: int, npages: int) -> asyncio.Future[memoryview | None]:
        """The pages [start, +npages) as one view, read as part of a run; None when no
        run took the read (it was alone, or its run was refused): the caller reads alone."""
        future: asyncio.Future[memoryview | None] = self.loop.create_future()
        if not self._queued:
            self.loop.call_soon(self._flush)
        self._queued.append(_Read(start, start + (npages << PAGE_SHIFT), future))
        return future

    def _flush(self) -> None:
        """Group this turn's reads into runs and send each run of two or more."""
        queued, self._queued = self._queued, []
        if len(queued) == 1:
            _alone([queued[0]])
            return
        queued.sort(key=lambda r: r.start)
        limit = self._max_pages() << PAGE_SHIFT
        gap = MAX_GAP_PAGES << PAGE_SHIFT
        group = [queued[0]]
        lo, hi = queued[0].start, queued[0].end
        for read in queued[1:]:
            new_hi = max(hi, read.end)
            if read.start - hi <= gap and new_hi - lo <= limit:
                group.append(read)
                hi = new_hi
                continue
            self._send_run(group, lo, hi)
            group, lo, hi = [read], read.start, read.end
        self._send_run(group, lo, hi)

    def _send_run(self, group: list[_Read], lo: int, hi: int) -> None:
        """Send ``group`` as one read of [lo, hi) if it has company and every page of the
        run holds a VALID translation now; else each read goes alone."""
        if len(group) < 2:
            _alone(group)
            return
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
                read.future.set_result(data[read.start - start : read.end - start])


def _alone(group: list[_Read]) -> None:
    """Tell each read of ``group`` to go alone."""
    for read in group:
        if not read.future.done():
            read.future.set_result(None)
