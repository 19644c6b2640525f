"""Agent sessions: identity, lease, and the per-connection INVALIDATE numbering.

Acks are cumulative: ``ACK(n)`` covers every INVALIDATE numbered up to ``n``
on this session. Per-peer FIFO ordering of the ZeroMQ connection makes that
sound. Sequence state belongs to exactly one consumer, the session.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgpack
from hmmirror.daemon.linux.creds import Creds
from hmmirror.transport.peer import Peer

if TYPE_CHECKING:
    from hmmirror.daemon.invalidation import Invalidation
    from hmmirror.daemon.mm import Mirror


class Items:
    """Wire items ``[seq, start, end, event]`` of one invalidation, shared by every mirror
    they apply to unchanged, and packed for the wire at most once."""

    __slots__ = ("_packed", "items")

    def __init__(self, items: list[tuple[int, int, int, int]]) -> None:
        self.items = items
        self._packed: bytes | None = None

    def packed(self) -> bytes:
        """``msgpack.packb(items)``, computed once."""
        if self._packed is None:
            self._packed = msgpack.packb(self.items)
        return self._packed


#: What a session queues: items for one mirror from one invalidation, with both.
Chunk = tuple[Items, "Invalidation", "Mirror"]


@dataclass(eq=False)
class Session:
    """One agent connection, from HELLO to GOODBYE, lease expiry or eviction."""

    id: int
    identity: bytes
    name: str
    last_seen: float
    peer: Peer = field(default_factory=Peer)
    """Who the agent is, as the transport proved it (policy, logs)."""
    credentials: Creds | None = None
    """The agent process's own credentials, read at HELLO (``ipc://`` only; None when they
    could not be proven): the kernel's ptrace rule compares them with a target's."""
    physical_frames: bool = False
    """Entries carry real PFNs (a root agent over ipc, or a ``frames = "physical"`` grant);
    otherwise opaque frame tokens."""
    inspector: bool = False
    """May see every session's mirrors in ``inventory`` and the full ``status``."""
    mirrors: dict[int, Mirror] = field(default_factory=dict)
    fenced: bool = False
    next_n: int = 1
    next_id: int = 1
    batch: list[Chunk] = field(default_factory=list)
    unacked: deque[tuple[int, list[Chunk], dict[Invalidation, int]]] = field(default_factory=deque)

    def take_id(self) -> int:
        """A fresh header id for a daemon-originated message."""
        self.next_id += 1
        return self.next_id

    def pending_overlap(self, mirror: Mirror, start: int, end: int) -> bool:
        """Whether an INVALIDATE of [start, end) for ``mirror`` is queued or unacked."""
        for chunks in (self.batch, *(chunks for _, chunks, _ in self.unacked)):
            for part, _, m in chunks:
                if m is mirror and any(lo < end and start < hi for _, lo, hi, _ in part.items):
                    return True
        return False
