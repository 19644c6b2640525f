"""Reusable page-aligned buffers for large DMA reads, lent to ZeroMQ zero-copy.

A fresh anonymous mapping per 2 MiB read costs eight times the copy itself
(512 page faults, zeroing, then an munmap with its TLB flush). A read buffer
is therefore taken from this pool, filled by ``process_vm_readv``, and sent
as a tracked ``zmq.Frame``: the pool hands it out again only once ZeroMQ has
released it (its ``MessageTracker`` is done), so a queued reply is never
overwritten.

Buffers are taken on a target's copy worker, right before the copy, so that
copies waiting in a queue hold none; the pool is therefore shared under a lock.
"""

from __future__ import annotations

import mmap
import threading

import zmq

#: Buffers kept for reuse beyond those in flight.
KEEP = 8


class ReadBuffers:
    """A pool of ``size``-byte mmap buffers (page-aligned by construction)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[mmap.mmap] = []
        self._lent: list[tuple[mmap.mmap, zmq.MessageTracker]] = []
        self.allocated = 0
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        """A buffer nobody uses, reclaimed from ZeroMQ or newly mapped (any thread)."""
        with self._lock:
            buf = self._reuse()
            if buf is not None:
                return buf
            self.allocated += 1
        return mmap.mmap(-1, self.size)

    def _reuse(self) -> mmap.mmap | None:
        """A free buffer, reclaiming those ZeroMQ is done with first; None if there is none."""
        if not self._free and self._lent:
            still: list[tuple[mmap.mmap, zmq.MessageTracker]] = []
            for buf, tracker in self._lent:
                if tracker.done:
                    if len(self._free) < KEEP:
                        self._free.append(buf)
                else:
                    still.append((buf, tracker))
            self._lent = still
        if self._free:
            return self._free.pop()
        return None

    def give_back(self, buf: mmap.mmap) -> None:
        """Return a buffer that was never lent (the read failed)."""
        with self._lock:
            if len(self._free) < KEEP:
                self._free.append(buf)

    def lend(self, buf: mmap.mmap, length: int) -> zmq.Frame:
        """The first ``length`` bytes of ``buf`` as a zero-copy frame; ``buf`` comes back
        to the pool once ZeroMQ is done with it."""
        frame = zmq.Frame(memoryview(buf)[:length], track=True)
        assert frame.tracker is not None
        with self._lock:
            self._lent.append((buf, frame.tracker))
        return frame
