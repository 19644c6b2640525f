"""The reply budget's accounting (``hmmirror.transport.budget``) and hmmd's ``reply_cap`` setting.

Trackers here are stand-ins whose ``done`` the test sets, as libzmq's release
would: the end-to-end bound (a real hmmd, a real never-reading peer) is
``tests/security/test_memory_bound.py``.
"""

from __future__ import annotations

import pytest
from hmmirror.daemon.config import ConfigError, load
from hmmirror.transport.budget import (
    MESSAGE_OVERHEAD,
    SMALL_ROOM,
    TRACK_MIN,
    UNTRACKED_MAX,
    ReplyBudget,
    frame_bytes,
)

MIB = 1 << 20
PEER = b"\x00peer"


class Tracker:
    """A tracker whose message libzmq has (``done``) or has not let go of."""

    def __init__(self) -> None:
        self.done = False


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def send_big(budget: ReplyBudget, nbytes: int = 4 * MIB) -> Tracker:
    """A reserved bulk reply of ``nbytes``, sent tracked; its tracker."""
    assert budget.reserve(PEER, nbytes)
    assert budget.wants_tracker(PEER, nbytes)
    tracker = Tracker()
    budget.sent(PEER, nbytes, tracker, reserved=nbytes)
    return tracker


def test_bulk_replies_past_the_cap_are_refused_until_the_peer_reads() -> None:
    budget = ReplyBudget(32 * MIB, deadline=1.0)
    trackers = [send_big(budget) for _ in range(7)]
    assert not budget.reserve(PEER, 4 * MIB), "7 x 4 MiB + overheads + 4 MiB > 32 MiB"
    assert budget.refusals == 1
    assert budget.held(PEER) == 7 * (4 * MIB + MESSAGE_OVERHEAD)
    trackers[0].done = True
    assert budget.reserve(PEER, 4 * MIB), "one reply was taken: room for one more"


def test_a_done_tracker_releases_the_copied_replies_sent_before_it() -> None:
    budget = ReplyBudget(32 * MIB, deadline=1.0)
    first = send_big(budget)
    budget.sent(PEER, 100, None)  # small, copied, untracked
    last = send_big(budget)
    first.done = last.done = True  # libzmq releases one peer's messages in order
    assert budget.held(PEER) == 0, "the untracked reply between them is released too"


def test_an_early_tracker_done_releases_only_up_to_itself() -> None:
    budget = ReplyBudget(32 * MIB, deadline=1.0)
    first = send_big(budget)
    budget.sent(PEER, 100, None)
    send_big(budget)
    first.done = True
    assert budget.held(PEER) == 100 + MESSAGE_OVERHEAD + 4 * MIB + MESSAGE_OVERHEAD


def test_copied_replies_are_tracked_every_untracked_max_bytes() -> None:
    budget = ReplyBudget(32 * MIB, deadline=1.0)
    assert budget.wants_tracker(PEER, TRACK_MIN)
    assert not budget.wants_tracker(PEER, 200)
    sent = 0
    while not budget.wants_tracker(PEER, 200):
        budget.sent(PEER, 200, None)
        sent += 200 + MESSAGE_OVERHEAD
    assert sent <= UNTRACKED_MAX < sent + 200 + MESSAGE_OVERHEAD
    tracker = Tracker()
    budget.sent(PEER, 200, tracker)
    assert not budget.wants_tracker(PEER, 200), "a tracked message restarts the count"
    tracker.done = True
    assert budget.held(PEER) == 0


def test_small_requests_have_room_past_the_cap_then_are_refused() -> None:
    budget = ReplyBudget(8 * MIB, deadline=1.0)
    send_big(budget, 8 * MIB - MESSAGE_OVERHEAD)
    assert not budget.full(PEER), "a write's ok still fits in SMALL_ROOM"
    budget.sent(PEER, SMALL_ROOM, Tracker())
    assert budget.full(PEER)
    assert budget.refusals == 1


def test_unsent_reservations_are_given_back() -> None:
    budget = ReplyBudget(8 * MIB, deadline=1.0)
    assert budget.reserve(PEER, 4 * MIB)
    assert not budget.reserve(PEER, 4 * MIB)
    budget.unreserve(PEER, 4 * MIB)
    assert budget.held(PEER) == 0
    assert budget.reserve(PEER, 4 * MIB)


def test_a_peer_stalled_at_its_cap_past_the_deadline_is_reported() -> None:
    clock = Clock()
    budget = ReplyBudget(8 * MIB, deadline=1.0, clock=clock)
    first = send_big(budget)
    assert not budget.reserve(PEER, 4 * MIB)  # refused: the stall begins
    clock.now += 0.9
    assert budget.sweep() == []
    clock.now += 0.2
    assert [peer for peer, _ in budget.sweep()] == [PEER]
    first.done = True  # it read after all: no longer stalled, and forgotten once idle
    assert budget.sweep() == []
    assert PEER not in budget.peers


def test_a_reading_peer_is_never_stalled() -> None:
    clock = Clock()
    budget = ReplyBudget(8 * MIB, deadline=1.0, clock=clock)
    first = send_big(budget)
    send_big(budget, 3 * MIB)
    assert not budget.reserve(PEER, 4 * MIB)
    clock.now += 0.5
    first.done = True  # progress
    clock.now += 0.9
    assert budget.sweep() == []


def test_a_peer_with_only_reservations_is_not_stalled() -> None:
    clock = Clock()
    budget = ReplyBudget(8 * MIB, deadline=1.0, clock=clock)
    assert budget.reserve(PEER, 6 * MIB)  # a fault still populating: nothing to read yet
    assert not budget.reserve(PEER, 4 * MIB)
    clock.now += 5
    assert budget.sweep() == []
    assert PEER in budget.peers, "a peer with a reservation is remembered"


def test_frame_bytes_counts_bytes_not_elements() -> None:
    import numpy as np

    assert frame_bytes([b"abc", memoryview(bytes(10)), np.zeros(4, dtype="<u8")]) == 3 + 10 + 32


def test_reply_cap_is_a_size_from_every_layer() -> None:
    assert load(path="/dev/null", env={}).reply_cap == 32 * MIB
    assert load(path="/dev/null", env={"HMMIRROR_REPLY_CAP": "64MiB"}).reply_cap == 64 * MIB
    assert load(path="/dev/null", env={}, flags={"reply_cap": "1G"}).reply_cap == 1 << 30
    assert 'reply_cap = "48MiB"' in load("/dev/null", {}, {"reply_cap": "48M"}).as_toml()
    with pytest.raises(ConfigError, match="at least 8MiB"):
        load(path="/dev/null", env={"HMMIRROR_REPLY_CAP": "1MiB"})
    with pytest.raises(ConfigError, match="not a size"):
        load(path="/dev/null", env={"HMMIRROR_REPLY_CAP": "lots"})
