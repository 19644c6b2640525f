"""The shared-memory DMA window (protocol 1.1): ``window_open`` and its ``window_ticket``,
``dma_read_into`` and ``dma_write_from`` (SPEC §4.9).

A local agent (``ipc://``) that moves large DMAs may share a sealed memfd with
hmmd: it asks for a one-time ticket with ``window_open``, hands the memfd to
hmmd's door with the line ``window <ticket>``, and from then on names byte
offsets of that memfd instead of carrying the data in bulk frames. The window
belongs to the session and ends with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hmmirror.proto.messages.base import Message
from hmmirror.proto.messages.limits import MAX_DMA_PAGES, MAX_WINDOW, U32_MAX
from hmmirror.proto.schema import Kind, wire

#: Hex digits of a window ticket (128 bits).
TICKET_HEX = 32


@dataclass(frozen=True)
class WindowOpen(Message):
    """Agent → daemon: ask for a ticket to attach a window of ``size`` bytes.

    ``size`` is a multiple of 4096 in [4096, ``welcome.window_max``]. Answered by
    ``window_ticket``, or ``error``: PERMISSION_DENIED (not a local session, or
    windows off), EBUSY (the session has a window already, or hmmd's window caps
    are reached), EINVAL (a bad size), UNKNOWN_MESSAGE (the session said hello as 1.0).
    """

    TYPE: ClassVar[str] = "window_open"
    size: int = wire(Kind.UINT, MAX_WINDOW)


@dataclass(frozen=True)
class WindowTicket(Message):
    """Daemon → agent, answering ``window_open``: the one-time ``ticket`` (32 hex digits)
    for the door line ``window <ticket>``, valid for ``expires_ms``."""

    TYPE: ClassVar[str] = "window_ticket"
    ticket: str = wire(Kind.STR, TICKET_HEX)
    expires_ms: int = wire(Kind.UINT, U32_MAX)


@dataclass(frozen=True)
class DmaReadInto(Message):
    """Agent → daemon: read ``npages`` pages at ``start`` into the window at ``offset``.

    Checked exactly as ``dma_read`` (bulk frame ``entries``, ``npages`` u64, all
    VALID; STALE before and after the copy). ``offset`` is page-aligned and
    ``offset + npages * 4096`` lies within the window, else EINVAL. Answered by
    ``ok`` once the data is in the window, or ``error``.
    """

    TYPE: ClassVar[str] = "dma_read_into"
    BULK: ClassVar[tuple[str, ...]] = ("entries",)
    mirror: int = wire(Kind.UINT)
    start: int = wire(Kind.UINT)
    npages: int = wire(Kind.UINT, MAX_DMA_PAGES)
    offset: int = wire(Kind.UINT, MAX_WINDOW, default=0)

    def bulk_sizes(self) -> tuple[int, ...]:
        """One entry frame of ``npages * 8`` bytes."""
        return (self.npages * 8,)


@dataclass(frozen=True)
class DmaWriteFrom(Message):
    """Agent → daemon: write ``length`` bytes of the window at ``offset`` into the pages
    at ``start``.

    The data lands at byte ``offset % 4096`` of the first page (so an agent that
    puts it at a page-aligned slot plus the address's page offset writes exactly
    where it means to); ``length`` 0 means ``npages * 4096``. As in ``dma_write``
    the pages are exactly those the bytes touch, and ``offset + length`` lies
    within the window, else EINVAL. Bulk frame ``entries`` (all VALID|WRITE).
    Answered by ``ok`` or ``error``.
    """

    TYPE: ClassVar[str] = "dma_write_from"
    BULK: ClassVar[tuple[str, ...]] = ("entries",)
    mirror: int = wire(Kind.UINT)
    start: int = wire(Kind.UINT)
    npages: int = wire(Kind.UINT, MAX_DMA_PAGES)
    offset: int = wire(Kind.UINT, MAX_WINDOW, default=0)
    length: int = wire(Kind.UINT, MAX_DMA_PAGES * 4096, default=0)

    def bulk_sizes(self) -> tuple[int, ...]:
        """One entry frame of ``npages * 8`` bytes."""
        return (self.npages * 8,)
