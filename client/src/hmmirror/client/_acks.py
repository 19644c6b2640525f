"""The INVALIDATE acks a session owes hmmd, held behind the DMAs they must wait for.

Each INVALIDATE carries ``n``, the session's count of them; one ACK of ``n``
acknowledges every INVALIDATE up to it (SPEC §4). Its zaps are done the moment
the drain loop handled it, but an ACK may only go out once no DMA of ours that
overlaps a zapped page is still in flight: those DMAs are the fences queued with it.
"""

from __future__ import annotations

import asyncio
from collections import deque


class AckQueue(deque[tuple[int, list[asyncio.Future[None]]]]):
    """The INVALIDATEs not yet acked, in arrival order: ``(n, fences)`` each."""

    def __init__(self) -> None:
        super().__init__()
        #: The highest n acked so far (sent): a later ACK must cover more.
        self.acked = 0

    def clear(self) -> None:
        """A new session (WELCOME) counts its INVALIDATEs from 1 again: owe nothing."""
        super().clear()
        self.acked = 0

    def drained(self) -> int:
        """Pop the INVALIDATEs whose fences have all drained; return the highest n that
        may be acked now (``acked`` when nothing new may be)."""
        upto = self.acked
        while self:
            fences = self[0][1]
            # Usually none: no DMA of ours overlapped the zapped pages.
            if fences and not all(f.done() for f in fences):
                break
            upto = self.popleft()[0]
        return upto
