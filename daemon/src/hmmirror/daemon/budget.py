"""hmmd's use of the reply budget (``hmmirror.transport.budget``): what a bulk reply reserves,
how a send is tracked, and the EAGAIN refusal.

Every reply goes through ``outbox.Courier.reply``, which counts its bytes against the
connection's cap and sends it tracked when the budget asks; a request whose
reply would take the connection past ``reply_cap`` is refused with EAGAIN
before anything is copied. The budget is keyed by routing id, not by session,
so a peer that says HELLO again keeps what it has not read.
"""

from __future__ import annotations

from typing import Any

import zmq
from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.linux.procfs import PAGE_SHIFT
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import MAX_DMA_PAGES, Fault, FaultMode
from hmmirror.transport.budget import ReplyBudget, Tracker


def track_last(frames: list[Any]) -> Tracker:
    """The tracker of the message's last frame, made a tracked zero-copy frame if need be.

    libzmq lets go of a message's frames in order, so the last one's tracker
    covers the whole message.
    """
    last = frames[-1]
    if not isinstance(last, zmq.Frame) or last.tracker is None:
        last = frames[-1] = zmq.Frame(last, track=True, copy=False)
    tracker: zmq.MessageTracker | None = last.tracker  # a pooled DMA buffer comes tracked
    assert tracker is not None
    return tracker


def fault_reply_bytes(msg: Fault) -> int:
    """The largest reply a FAULT can get: its entries, and the data of a read in the trip."""
    nbytes = msg.npages * 8
    if msg.read and msg.mode == FaultMode.POPULATE and msg.npages <= MAX_DMA_PAGES:
        nbytes += msg.npages << PAGE_SHIFT
    return nbytes


def busy(budget: ReplyBudget, identity: bytes, what: str) -> RequestError:
    """The EAGAIN refusal of a request whose reply the connection has no room for."""
    held = budget.held(identity)
    return RequestError(
        ErrorCode.EAGAIN,
        f"{what} refused: {held >> 10} KiB of replies are queued for this connection "
        f"(reply_cap {budget.cap >> 10} KiB); read them first",
    )
