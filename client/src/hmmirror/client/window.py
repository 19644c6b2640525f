"""The agent's end of a shared-memory DMA window (SPEC §4.9): a sealed memfd, cut into slots.

hmmd maps the same memfd, so ``dma_read_into`` leaves the data where the agent
can send it on (zero-copy) and ``dma_write_from`` takes it from where the agent
put it: no DMA data crosses the socket to hmmd. ``DmaWindow`` owns the memfd
and its mapping and hands out *slots*, runs of whole pages, first fit.

A slot is reused only when nothing can still touch it:

- a read's slot whose data went out zero-copy comes back once libzmq released
  the frame (its ``MessageTracker``, as ``lend`` records it);
- a slot whose request hmmd answered EBUSY, or that was never answered (a
  timeout, a cancel), is *quarantined* for the window's life: hmmd may still be
  copying into or out of it (its copy deadline abandons a blocked call, it does
  not stop it), and hmmd maps the same memfd again after a re-HELLO.

When no slot is free the caller takes the plain path (data in bulk frames).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import mmap
import os

import zmq

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
#: The default size of hm-agent's window: 16 slots of a 2 MiB RDMA READ or WRITE.
DEFAULT_SIZE = 32 << 20
#: DMAs smaller than this take the plain path (the bulk frame costs little there).
WINDOW_MIN = 64 << 10
#: How long a DMA waits for a slot libzmq still holds before it takes the plain path, and
#: how often it looks meanwhile (seconds).
PATIENCE, POLL = 0.005, 0.0002


class Slot:
    """Pages ``[offset, offset + npages * 4096)`` of a window, lent to one request."""

    __slots__ = ("npages", "offset", "window")

    def __init__(self, window: DmaWindow, offset: int, npages: int) -> None:
        self.window = window
        self.offset = offset
        self.npages = npages

    @property
    def view(self) -> memoryview:
        """The slot's bytes (writable)."""
        return memoryview(self.window.map)[self.offset : self.offset + (self.npages << PAGE_SHIFT)]


class DmaWindow:
    """A sealed memfd of ``size`` bytes (a page multiple), mapped here, with its slots."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < PAGE_SIZE or size % PAGE_SIZE:
            raise ValueError(f"a DMA window is a positive multiple of {PAGE_SIZE} bytes: {size}")
        self.size = size
        self.fd = os.memfd_create("hmmirror-dma-window", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            os.posix_fallocate(self.fd, 0, size)  # its memory exists now: no fault runs short
            fcntl.fcntl(
                self.fd, fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
            )  # fmt: skip
            self.map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        #: Free page runs (first page, pages), in address order.
        self._free: list[tuple[int, int]] = [(0, size >> PAGE_SHIFT)]
        #: Slots whose data libzmq may still be sending, with the tracker that says when not.
        self._lent: list[tuple[zmq.MessageTracker, list[Slot]]] = []
        self.quarantined = 0
        self.counters = dict.fromkeys(("slots", "fallbacks"), 0)

    def take(self, nbytes: int) -> Slot | None:
        """A slot of at least ``nbytes`` (whole pages), or None if none is free now."""
        npages = (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT
        slot = self._first_fit(npages)
        if slot is None and self._lent:
            self._reclaim()
            slot = self._first_fit(npages)
        return slot

    async def take_soon(self, nbytes: int, patience: float = PATIENCE) -> Slot | None:
        """``take``, waiting up to ``patience`` s while slots are still lent to libzmq.

        pyzmq marks a tracker done on its garbage-collector thread, which needs the GIL:
        while this loop is busy, slots libzmq has long sent stay lent. A short sleep lets
        that thread run; never longer than ``patience``, then the caller's plain path.
        """
        slot = self.take(nbytes)
        if slot is None and self._lent:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + patience
            while slot is None and self._lent and loop.time() < deadline:
                await asyncio.sleep(POLL)
                slot = self.take(nbytes)
        self.counters["slots" if slot is not None else "fallbacks"] += 1
        return slot

    def _first_fit(self, npages: int) -> Slot | None:
        """Carve ``npages`` from the first free run long enough."""
        for i, (first, count) in enumerate(self._free):
            if count >= npages:
                if count == npages:
                    del self._free[i]
                else:
                    self._free[i] = (first + npages, count - npages)
                return Slot(self, first << PAGE_SHIFT, npages)
        return None

    def _reclaim(self) -> None:
        """Free the lent slots libzmq is done with."""
        still = []
        for tracker, slots in self._lent:
            if tracker.done:
                for slot in slots:
                    self.give_back(slot)
            else:
                still.append((tracker, slots))
        self._lent = still

    def give_back(self, slot: Slot) -> None:
        """``slot`` is free again (nothing reads or writes it any more)."""
        first, count = slot.offset >> PAGE_SHIFT, slot.npages
        runs = self._free
        i = 0
        while i < len(runs) and runs[i][0] < first:
            i += 1
        runs.insert(i, (first, count))
        # Merge with the neighbours, so that large slots stay possible.
        if i + 1 < len(runs) and first + count == runs[i + 1][0]:
            runs[i] = (first, count + runs[i + 1][1])
            del runs[i + 1]
        if i > 0 and runs[i - 1][0] + runs[i - 1][1] == first:
            runs[i - 1] = (runs[i - 1][0], runs[i - 1][1] + runs[i][1])
            del runs[i]

    def lend(self, slots: list[Slot], tracker: zmq.MessageTracker) -> None:
        """``slots`` went out zero-copy: free them once ``tracker`` says libzmq let go."""
        self._lent.append((tracker, slots))

    def quarantine(self, slot: Slot) -> None:
        """Never reuse ``slot``: hmmd may still copy into or out of it."""
        self.quarantined += slot.npages

    def close(self) -> None:
        """Close the memfd and unmap (a view still lent keeps the mapping until released)."""
        os.close(self.fd)
        # A frame libzmq still sends holds a view: the last reference unmaps it then.
        with contextlib.suppress(BufferError):
            self.map.close()
