"""The outbox: the one writer of everything hmmd sends an agent connection.

Three kinds of message go to an agent over one socket: the replies (and error
replies) to its requests, the fan-out's INVALIDATEs, and EVICTED. SPEC.md's
ordering guarantee needs an INVALIDATE queued for a session to reach it before
any later reply: a FAULT_REPLY that overtook the INVALIDATE of its pages would
install a stale translation. ``Courier`` writes all three, and enforces that rule
here and only here: a reply first sends the session's queued INVALIDATEs.

Each session's ``Outbox`` holds its INVALIDATEs, queued for this loop tick
(``batch``) and sent but not acked (``unacked``, by number ``n``). The fan-out
(``invalidation``) decides what to queue and does the ack accounting; the
outbox numbers, batches and writes. A lone item goes out at once, so it pays no
batching delay. Items issued while a session has ``WINDOW`` INVALIDATEs in flight
wait for its next ACK, and go out together at the end of the loop tick that ACK
arrived in (a session with fewer in flight gets this tick's items at the end of
the tick): under load the batch grows with the agent's round trip, so the
number of messages (and of wake-ups on both ends) stays near one per round trip
per session instead of one per loop tick, as TCP's Nagle algorithm does. Held
items wait at most ``HOLD_MAX`` for that ACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Generic, Protocol, TypeVar

import msgpack
from hmmirror.daemon import logfmt
from hmmirror.daemon.budget import track_last
from hmmirror.daemon.state import Mirror, Session
from hmmirror.proto.codec import encode, encode_invalidate
from hmmirror.proto.messages import MAX_ITEMS, Evicted, Message
from hmmirror.proto.version import MIRRORS_VERSION
from hmmirror.transport import Unreachable
from hmmirror.transport.budget import ReplyBudget, frame_bytes

log = logging.getLogger(__name__)
#: Replies a peer never read: one line each would let it flood the log (and hmmd's loop).
_dropped = logfmt.Limited(log, "dropped replies")

#: INVALIDATEs a session may have sent and not acked before later items wait for its ACK.
#: 1 measured best on 2 vCPUs (bench/README.md, soak): each message costs both ends a
#: wake-up and a few syscalls, so a batch that grows while the agent works pays.
WINDOW = 1
#: The longest items wait for an ACK (seconds) before they go anyway: an agent whose ACK waits
#: on a long DMA fence (SPEC §6.2) still hears of later invalidations at once, and a held item
#: never spends more than this of its ack deadline waiting. Above the soak's ack p50 (~2 ms
#: on 2 vCPUs), so batching holds under load.
HOLD_MAX = 0.005

#: What the fan-out tracks per queued chunk (``invalidation.Invalidation``).
T = TypeVar("T")


class Sender(Protocol):
    """The socket side the courier writes through (``transport.Server`` is it)."""

    def send(self, rid: bytes, frames: Sequence[Any], *, copy: bool = True) -> None:
        """Queue ``frames`` to ``rid`` without blocking; raise ``Unreachable`` on failure."""


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


@dataclass(eq=False)
class Outbox(Generic[T]):
    """One session's INVALIDATEs: queued chunks (``batch``: items for one mirror, tagged with
    what the fan-out tracks them by), and those sent but not acked (``unacked``: number ``n``,
    its chunks, and how many items it carries per tag)."""

    next_n: int = 1
    batch: list[tuple[Items, T, Mirror]] = field(default_factory=list)
    unacked: deque[tuple[int, list[tuple[Items, T, Mirror]], dict[T, int]]] = field(
        default_factory=deque
    )

    def pending_overlap(self, mirror: Mirror, start: int, end: int) -> bool:
        """Whether an INVALIDATE of [start, end) for ``mirror`` is queued or unacked."""
        for chunks in (self.batch, *(chunks for _, chunks, _ in self.unacked)):
            for part, _, m in chunks:
                if m is mirror and any(lo < end and start < hi for _, lo, hi, _ in part.items):
                    return True
        return False


class Courier(Generic[T]):
    """Writes every message hmmd sends an agent, through each session's outbox, in order."""

    def __init__(
        self, sender: Sender, budget: ReplyBudget, lost: Callable[[Session, str], None]
    ) -> None:
        self.sender = sender
        #: Reply bytes queued or being prepared, per connection, against ``reply_cap``.
        self.budget = budget
        #: Called when a session's connection cannot take a message (it is evicted).
        self.lost = lost
        self.boxes: dict[Session, Outbox[T]] = {}
        self._flush_pending: set[Session] = set()
        #: INVALIDATEs in flight per session before later items wait for an ACK.
        self.window = WINDOW
        #: How long items may wait for an ACK; the timer of each session holding some.
        self.hold_max = HOLD_MAX
        self._held: dict[Session, asyncio.TimerHandle] = {}

    def outbox(self, session: Session) -> Outbox[T]:
        """``session``'s outbox (made on first use)."""
        box = self.boxes.get(session)
        if box is None:
            box = self.boxes[session] = Outbox()
        return box

    def forget(self, session: Session) -> Outbox[T] | None:
        """Drop ``session``'s outbox (it was evicted or left); what it held is returned."""
        self._flush_pending.discard(session)
        timer = self._held.pop(session, None)
        if timer is not None:
            timer.cancel()
        return self.boxes.pop(session, None)

    def sent(self, session: Session) -> int:
        """How many INVALIDATEs ``session`` was sent (the highest ``n`` it may ack)."""
        box = self.boxes.get(session)
        return box.next_n - 1 if box is not None else 0

    # --- INVALIDATE ---------------------------------------------------------------------------

    def queue(self, session: Session, chunk: tuple[Items, T, Mirror]) -> None:
        """Queue ``chunk``: send now if nothing is unacked, else flush later this tick."""
        box = self.boxes.get(session)
        if box is None:
            box = self.boxes[session] = Outbox()
        if session in self._flush_pending:
            box.batch.append(chunk)
        elif not box.unacked and not box.batch:
            self._send_one(session, box, chunk)  # nothing in flight: no batching delay
        else:
            box.batch.append(chunk)
            if not box.unacked:
                self.flush(session)
            elif len(box.unacked) < self.window:
                self._flush_pending.add(session)
                asyncio.get_running_loop().call_soon(self._scheduled_flush, session)
            elif session not in self._held:  # held until an ACK makes room (``acked``)
                self._held[session] = asyncio.get_running_loop().call_later(
                    self.hold_max, self._hold_expired, session
                )

    def _hold_expired(self, session: Session) -> None:
        """Items waited ``hold_max`` for an ACK: send them anyway."""
        del self._held[session]
        box = self.boxes.get(session)
        if box is not None and box.batch and session not in self._flush_pending:
            self.flush(session)

    def acked(self, session: Session) -> None:
        """``session``'s ACK made room in its window: send what waited, at the end of this
        tick (with whatever else this tick queues for it)."""
        box = self.boxes.get(session)
        if (
            box is not None
            and box.batch
            and session not in self._flush_pending
            and len(box.unacked) < self.window
        ):
            self._flush_pending.add(session)
            asyncio.get_running_loop().call_soon(self._scheduled_flush, session)

    def _scheduled_flush(self, session: Session) -> None:
        """The deferred flush ``queue`` scheduled for ``session``."""
        self._flush_pending.discard(session)
        if session in self.boxes:  # not forgotten meanwhile: a flush must not make a new box
            self.flush(session)

    def flush(self, session: Session) -> None:
        """Send ``session``'s queued chunks now: one INVALIDATE (per ``MAX_ITEMS``) for them
        all, or one per mirror to a session whose ``hello`` said less than 1.2.

        Chunks are grouped by mirror, each mirror's in the order they were queued: the
        order between two mirrors' items carries nothing (each zaps its own table, and
        one cumulative ACK covers both), so a batch over several targets costs one
        message (1.2, ``Invalidate.mirrors``), or one per mirror, not one per run.
        """
        box = self.outbox(session)
        timer = self._held.pop(session, None)
        if timer is not None:
            timer.cancel()
        batch = box.batch
        if len(batch) > 2:
            m0 = batch[0][2]
            if any(chunk[2] is not m0 for chunk in batch):
                groups: dict[Mirror, list[tuple[Items, T, Mirror]]] = {}
                for chunk in batch:
                    groups.setdefault(chunk[2], []).append(chunk)
                box.batch = list(chain.from_iterable(groups.values()))
        one_mirror = session.version < MIRRORS_VERSION
        while box.batch and not session.fenced:
            first = box.batch[0]
            take, total = 0, 0
            for chunk in box.batch:
                if take and (
                    (one_mirror and chunk[2] is not first[2])
                    or total + len(chunk[0].items) > MAX_ITEMS
                ):
                    break
                take += 1
                total += len(chunk[0].items)
            chunks, box.batch = box.batch[:take], box.batch[take:]
            n = box.next_n
            box.next_n += 1
            # Credit acks per invalidation, not per item: one ACK may cover thousands.
            counts: dict[T, int] = {}
            for part, tag, _ in chunks:
                counts[tag] = counts.get(tag, 0) + len(part.items)
            box.unacked.append((n, chunks, counts))
            if take == 1:
                packed = first[0].packed()
            else:
                packed = msgpack.packb(list(chain.from_iterable(c[0].items for c in chunks)))
            mirrors = b""
            if not one_mirror and chunks[-1][2] is not first[2]:  # grouped: first and last differ
                mirrors = msgpack.packb(
                    list(chain.from_iterable([c[2].id] * len(c[0].items) for c in chunks))
                )
            frames = encode_invalidate(n, first[2].id, packed, session.take_id(), mirrors)
            try:
                self.sender.send(session.identity, frames)
            except Unreachable as exc:
                self.lost(session, f"INVALIDATE n={n} could not be delivered: {exc}")
                return

    def _send_one(self, session: Session, box: Outbox[T], chunk: tuple[Items, T, Mirror]) -> None:
        """``flush`` for a session whose batch would hold ``chunk`` alone (the W=1 path)."""
        if session.fenced:
            box.batch.append(chunk)  # kept for ``forgive``, as ``flush`` would leave it
            return
        part, tag, mirror = chunk
        n = box.next_n
        box.next_n = n + 1
        box.unacked.append((n, [chunk], {tag: len(part.items)}))
        frames = encode_invalidate(n, mirror.id, part.packed(), session.take_id())
        try:
            self.sender.send(session.identity, frames)
        except Unreachable as exc:
            self.lost(session, f"INVALIDATE n={n} could not be delivered: {exc}")

    # --- replies and EVICTED ------------------------------------------------------------------

    def reply(
        self,
        identity: bytes,
        session: Session | None,
        msg: Message,
        re: int = 0,
        bulk: Sequence[Any] = (),
        copy: bool = True,
        reserved: int = 0,
    ) -> None:
        """Send ``msg`` to ``identity`` (whose session is ``session``), after any INVALIDATE
        queued for it: the ordering rule.

        Its bytes count against the connection's reply cap until libzmq lets go of
        them, in place of the ``reserved`` bytes a bulk reply set aside.
        """
        if session is not None:
            box = self.boxes.get(session)
            if box is not None and box.batch:
                self.flush(session)
        msg_id = session.take_id() if session is not None else 1
        frames = encode(msg, msg_id, re, bulk)
        budget = self.budget
        nbytes = frame_bytes(frames)
        tracker = track_last(frames) if budget.wants_tracker(identity, nbytes) else None
        try:
            self.sender.send(identity, frames, copy=copy)
        except Unreachable as exc:
            budget.unreserve(identity, reserved)
            _dropped.info("reply %s to %r dropped: %s", msg.TYPE, identity, exc)
            if session is not None:
                self.lost(session, f"peer unreachable: {exc}")
            return
        budget.sent(identity, nbytes, tracker, reserved)

    def evicted(self, session: Session, mirrors: tuple[int, ...], reason: str) -> None:
        """Tell ``session`` it was evicted, best effort (its queued INVALIDATEs are forgiven
        first, so they never follow)."""
        msg = Evicted(mirrors=mirrors[:4096], reason=reason[:256])
        with contextlib.suppress(Unreachable):
            self.sender.send(session.identity, encode(msg, session.take_id()))
