"""Per-peer bounds, in bytes, on replies a peer has not taken yet (hmmd and hm-agent alike).

A ROUTER's send limit (SNDHWM) counts messages, and a zero-copy reply keeps its
whole buffer alive until libzmq has written it to the kernel: a peer that keeps
asking for 4 MiB reads and never reads its socket would make the sender queue
gigabytes. A ``ReplyBudget`` counts, per peer (routing id), the bytes of the
replies sent to it that libzmq still holds, plus the bytes reserved for replies
still being prepared, and refuses what would take a peer past its cap.

What libzmq let go of is learnt from message trackers (``zmq.MessageTracker``,
or anything with a ``done`` property). One peer's messages leave through one
pipe and one encoder, in the order they were queued, so a done tracker also
releases every message sent to that peer before it; trackers are settled in
that order. Replies with a large frame are zero-copy and always tracked (they
carry the big buffers); copied replies are counted with ``MESSAGE_OVERHEAD``
each and, before ``UNTRACKED_MAX`` bytes of them follow the last tracked one,
the next reply is sent tracked too.

The bound, per peer: libzmq holds at most ``cap`` + ``SMALL_ROOM`` +
``UNTRACKED_MAX`` bytes of replies, plus one reply that was not reserved (an
error, a status) sent while the peer was just under that, plus the little EBUSY
errors that refuse its further requests (at most SNDHWM of them: then the peer
is unreachable and is evicted). The kernel's socket buffer holds up to
2 x SO_SNDBUF more (capped by ``net.core.wmem_max``), outside the process.

This module does no I/O itself: ``hmmirror.transport.server`` users (hmmd,
hm-agent) call it around their sends.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

#: Bytes counted per message on top of its frames: libzmq's msg_t per frame, and the
#: allocation of a copied frame.
MESSAGE_OVERHEAD = 256
#: Copied (untracked) bytes a peer may be sent after its last tracked message; the
#: next message is then tracked. This is also how far the count may lag behind.
UNTRACKED_MAX = 256 * 1024
#: A message this large is tracked whatever the count (it is zero-copy anyway).
TRACK_MIN = 64 * 1024
#: Room past the cap for requests with small replies (a write's ``ok``, an atomic's old
#: value): a peer that reads, but pipelines more large reads than its cap, still gets
#: them served; one that never reads fills this too, and then gets only EBUSY.
SMALL_ROOM = 1 << 20


class Tracker(Protocol):
    """Says whether the transport let go of a message (``zmq.MessageTracker``)."""

    @property
    def done(self) -> bool:
        """True once the message's memory is released."""
        ...


def frame_bytes(frames: Any) -> int:
    """The payload bytes of a message's frames (bytes, memoryviews, arrays, zmq frames)."""
    total = 0
    for frame in frames:
        nbytes = getattr(frame, "nbytes", None)  # a numpy array's len() counts elements
        total += nbytes if isinstance(nbytes, int) else len(frame)
    return total


class Backlog:
    """One peer's reply bytes not yet taken: queued in the transport, or reserved."""

    __slots__ = ("_marks", "_untracked", "released", "reserved", "sent", "stalled_since")

    def __init__(self) -> None:
        self.sent = 0
        """Bytes of every message sent to the peer, counted as queued."""
        self.released = 0
        """Of those, the bytes known to be released (up to the last done tracker)."""
        self.reserved = 0
        """Bytes set aside for replies being prepared (a fault still populating)."""
        self.stalled_since: float | None = None
        """When a request of the peer was refused with nothing released since."""
        self._marks: deque[tuple[int, Tracker]] = deque()
        self._untracked = 0

    @property
    def queued(self) -> int:
        """Bytes sent and not known to be released."""
        return self.sent - self.released

    @property
    def held(self) -> int:
        """Bytes counted against the cap: queued and reserved."""
        return self.sent - self.released + self.reserved

    @property
    def waiting(self) -> bool:
        """Whether a tracked message is still queued (the peer has something to read)."""
        return bool(self._marks)

    def settle(self) -> bool:
        """Release every message up to the last done tracker; whether anything was released."""
        marks = self._marks
        progress = False
        while marks and marks[0][1].done:
            self.released = marks.popleft()[0]
            progress = True
        if progress:
            self.stalled_since = None  # the peer reads
        return progress

    def add(self, nbytes: int, tracker: Tracker | None) -> None:
        """Count a message of ``nbytes`` just queued, with its tracker if it has one."""
        self.sent += nbytes + MESSAGE_OVERHEAD
        if tracker is None:
            self._untracked += nbytes + MESSAGE_OVERHEAD
        else:
            self._untracked = 0
            self._marks.append((self.sent, tracker))


class ReplyBudget:
    """Caps, per peer, the reply bytes queued for it and reserved for it.

    ``reserve`` before preparing a bulk reply (refused past the cap); ``full``
    before answering anything else (refused past the cap and ``SMALL_ROOM``);
    ``wants_tracker`` and ``sent`` around each send; ``unreserve`` when a reserved
    reply is not sent. ``sweep``, now and then, finds the peers that stayed
    stalled past ``deadline`` and forgets idle ones.
    """

    def __init__(
        self, cap: int, deadline: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.cap = cap
        self.deadline = deadline
        self.clock = clock
        self.peers: dict[bytes, Backlog] = {}
        self.refusals = 0
        """Requests refused because their peer was at its cap."""

    def _backlog(self, peer: bytes) -> Backlog:
        """``peer``'s backlog, settled (created if it has none)."""
        backlog = self.peers.get(peer)
        if backlog is None:
            backlog = self.peers[peer] = Backlog()
        else:
            backlog.settle()
        return backlog

    def held(self, peer: bytes) -> int:
        """Bytes counted against ``peer``'s cap now."""
        backlog = self.peers.get(peer)
        if backlog is None:
            return 0
        backlog.settle()
        return backlog.held

    def _refuse(self, backlog: Backlog) -> bool:
        """Count a refusal; from now on the peer is stalled until it reads."""
        self.refusals += 1
        if backlog.stalled_since is None:
            backlog.stalled_since = self.clock()
        return False

    def full(self, peer: bytes) -> bool:
        """Whether ``peer`` has no room left even for a small reply (refuse its request with
        EBUSY; counted)."""
        backlog = self.peers.get(peer)
        if backlog is None:
            return False
        backlog.settle()
        if backlog.held < self.cap + SMALL_ROOM:
            return False
        self._refuse(backlog)
        return True

    def reserve(self, peer: bytes, nbytes: int) -> bool:
        """Set aside ``nbytes`` for a reply to ``peer``; False (counted) past the cap."""
        backlog = self._backlog(peer)
        if backlog.held + nbytes + MESSAGE_OVERHEAD > self.cap:
            return self._refuse(backlog)
        backlog.reserved += nbytes + MESSAGE_OVERHEAD
        return True

    def unreserve(self, peer: bytes, nbytes: int) -> None:
        """Give back a reservation whose reply is not sent (the request failed)."""
        if nbytes:
            backlog = self.peers.get(peer)
            if backlog is not None:
                backlog.reserved = max(0, backlog.reserved - nbytes - MESSAGE_OVERHEAD)

    def wants_tracker(self, peer: bytes, nbytes: int) -> bool:
        """Whether a message of ``nbytes`` to ``peer`` must be sent tracked."""
        if nbytes >= TRACK_MIN:
            return True
        backlog = self.peers.get(peer)
        return (
            backlog is not None and backlog._untracked + nbytes + MESSAGE_OVERHEAD > UNTRACKED_MAX
        )

    def sent(
        self, peer: bytes, nbytes: int, tracker: Tracker | None, reserved: int = 0
    ) -> None:  # fmt: skip
        """Count a message of ``nbytes`` queued to ``peer``, using a reservation if it had one."""
        backlog = self.peers.get(peer)
        if backlog is None:
            backlog = self.peers[peer] = Backlog()
        if reserved:
            backlog.reserved = max(0, backlog.reserved - reserved - MESSAGE_OVERHEAD)
        backlog.add(nbytes, tracker)

    def sweep(self) -> list[tuple[bytes, Backlog]]:
        """The peers stalled longer than ``deadline``; idle peers are forgotten.

        A peer is stalled from a refusal until something sent to it is released;
        one with no tracked message queued is not (it has nothing to read).
        Forgetting an idle peer drops at most ``UNTRACKED_MAX`` of copied bytes
        that were sent after its last tracked message: that is the count's lag.
        """
        now = self.clock()
        stalled: list[tuple[bytes, Backlog]] = []
        for peer, backlog in list(self.peers.items()):
            backlog.settle()
            if not backlog.waiting:
                backlog.stalled_since = None
                if not backlog.reserved:
                    del self.peers[peer]
                continue
            since = backlog.stalled_since
            if since is not None and now - since > self.deadline:
                stalled.append((peer, backlog))
        return stalled

    def forget(self, peer: bytes) -> None:
        """The peer's connection is gone (its queue with it): stop counting it."""
        self.peers.pop(peer, None)

    def total(self) -> int:
        """Bytes held for all peers (without settling: for status)."""
        return sum(b.held for b in self.peers.values())
