"""The fan-out's ack accounting (``invalidation.Invalidator``), with no socket and no process.

The Invalidator writes through a real ``outbox.Courier``; what the courier would
put on the wire goes to a recording ``Sender`` (the interface the outbox declares),
and is decoded with the proto codec to see what each agent would get. Sessions,
mms and mirrors are the daemon's own state objects; the mm's process is never
read (the fan-out does not look at it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import pytest
from hmmirror.daemon.invalidation import Invalidation, Invalidator
from hmmirror.daemon.linux.procfs import PAGE_SIZE, ProcessView
from hmmirror.daemon.outbox import Courier
from hmmirror.daemon.state import Mirror, Mm, Session, Span
from hmmirror.proto.codec import decode
from hmmirror.proto.messages import Access, Event, Invalidate, Ok
from hmmirror.transport import Unreachable
from hmmirror.transport.budget import ReplyBudget

LO, HI = 0x10000, 0x10000 + 16 * PAGE_SIZE


class RecordingSender:
    """Keeps what would have been sent, per routing id; ``unreachable`` ones fail."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []
        self.unreachable: set[bytes] = set()

    def send(self, rid: bytes, frames: Sequence[Any], *, copy: bool = True) -> None:
        """Record the decoded message, or raise Unreachable for an unreachable peer."""
        if rid in self.unreachable:
            raise Unreachable(f"peer {rid.hex()} is not connected")
        self.sent.append((rid, decode([bytes(f) for f in frames]).msg))

    def to(self, session: Session) -> list[Any]:
        """The messages ``session`` would have received, in order."""
        return [msg for rid, msg in self.sent if rid == session.identity]


class Fanout:
    """An Invalidator wired as hmmd wires it, with eviction as ``sessions.Sessions`` does it."""

    def __init__(self, ack_deadline: float = 5.0) -> None:
        self.sender = RecordingSender()
        self.evicted: list[tuple[Session, str]] = []
        self.idle: list[Mm] = []
        self.courier: Courier[Invalidation] = Courier(
            self.sender, ReplyBudget(1 << 20, ack_deadline), self.evict
        )
        self.inv = Invalidator(self.courier, ack_deadline, self.evict, self.idle.append)
        self.mm = Mm(pid=1, start_time=1, view=cast(ProcessView, None), pidfd=-1)
        self._ids = 0

    def evict(self, session: Session, reason: str) -> None:
        """Fence and forgive, as ``Sessions.evict`` does (less the mirrors it drops)."""
        if session.fenced:
            return
        session.fenced = True
        self.evicted.append((session, reason))
        self.inv.forgive(session)

    def session(self, name: str) -> Session:
        """A new session with one mirror over [LO, HI) of the mm."""
        self._ids += 1
        session = Session(self._ids, name.encode(), name, 0.0)
        mirror = Mirror(self._ids, session, self.mm, [Span(LO, HI)], Access.READ)
        self.mm.mirrors.append(mirror)
        session.mirrors[mirror.id] = mirror
        return session


def page(i: int) -> list[tuple[int, int]]:
    """The range of the mirror's page ``i``."""
    return [(LO + i * PAGE_SIZE, LO + (i + 1) * PAGE_SIZE)]


async def test_an_invalidation_completes_only_once_every_mirror_acked() -> None:
    f = Fanout()
    a, b = f.session("a"), f.session("b")
    inv = f.inv.begin(f.mm, page(0), Event.CLEAR)
    assert f.mm.seq % 2 == 1 and not inv.finished
    for s in (a, b):
        (msg,) = f.sender.to(s)
        assert isinstance(msg, Invalidate) and msg.n == 1 and msg.mirror == s.id
        assert msg.items == ((inv.seq, *page(0)[0], int(Event.CLEAR)),)
    f.inv.on_ack(a, 1)
    assert not inv.finished and f.mm.seq % 2 == 1
    f.inv.on_ack(b, 1)
    assert inv.finished and inv.done.done() and f.mm.seq % 2 == 0
    assert inv.not_acked == [] and f.inv.latency.recorded == 1
    assert f.idle == [f.mm]  # the mm's last window closed


async def test_a_cumulative_ack_covers_every_invalidate_up_to_n() -> None:
    f = Fanout()
    a = f.session("a")
    f.courier.window = 2  # the next INVALIDATE may go before the first is acked
    first = f.inv.begin(f.mm, page(0), Event.CLEAR)
    # One INVALIDATE is in flight: the next two wait for the end of this tick, together.
    second = f.inv.begin(f.mm, page(1), Event.UNMAP)
    third = f.inv.begin(f.mm, page(2), Event.CLEAR)
    assert [m.n for m in f.sender.to(a)] == [1]
    await asyncio.sleep(0)
    sent = f.sender.to(a)
    assert [m.n for m in sent] == [1, 2] and len(sent[1].items) == 2
    f.inv.on_ack(a, 2)
    assert first.finished and second.finished and third.finished
    assert f.inv.stray_acks == 0


async def test_a_late_repeated_or_unknown_ack_is_counted_and_ignored() -> None:
    f = Fanout()
    a, b = f.session("a"), f.session("b")
    inv = f.inv.begin(f.mm, page(0), Event.CLEAR)
    f.inv.on_ack(a, 1)
    f.inv.on_ack(a, 1)  # repeated
    assert f.inv.stray_acks == 1 and not inv.finished
    stranger = Session(99, b"x", "x", 0.0)
    f.inv.on_ack(stranger, 1)  # sent nothing
    assert f.inv.stray_acks == 2 and not inv.finished
    f.inv.on_ack(b, 1)
    assert inv.finished
    f.evict(b, "gone")
    f.inv.on_ack(b, 1)  # late: after its items were forgiven
    assert f.inv.stray_acks == 3


async def test_an_eviction_completes_the_invalidations_waiting_on_that_session() -> None:
    f = Fanout()
    a, b = f.session("a"), f.session("b")
    inv = f.inv.begin(f.mm, page(0), Event.CLEAR)
    f.inv.on_ack(a, 1)
    f.evict(b, "lease expired")
    assert inv.finished and inv.not_acked == ["b (session 2)"]
    assert f.mm.seq % 2 == 0
    assert f.inv.latency.recorded == 1  # a's ack still ended it: its round trip counts


async def test_a_session_fenced_before_the_fan_out_is_forgiven_at_once() -> None:
    f = Fanout()
    a = f.session("a")
    a.fenced = True
    inv = f.inv.begin(f.mm, page(0), Event.CLEAR)
    assert inv.finished and inv.not_acked == ["a (session 1)"] and f.sender.sent == []


async def test_an_undeliverable_invalidate_evicts_its_session() -> None:
    f = Fanout()
    a, b = f.session("a"), f.session("b")
    f.sender.unreachable.add(b.identity)
    inv = f.inv.begin(f.mm, page(0), Event.CLEAR)
    assert [s for s, _ in f.evicted] == [b]
    assert "INVALIDATE n=1 could not be delivered" in f.evicted[0][1]
    assert not inv.finished  # a still has to ack
    f.inv.on_ack(a, 1)
    assert inv.finished and inv.not_acked == ["b (session 2)"]


async def test_the_deadline_evicts_who_did_not_ack_then_completes() -> None:
    f = Fanout(ack_deadline=0.02)
    a, b = f.session("a"), f.session("b")
    inv = f.inv.begin(f.mm, page(0), Event.CLEAR)
    f.inv.on_ack(a, 1)
    await asyncio.wait_for(asyncio.shield(inv.done), 1.0)
    assert [s for s, _ in f.evicted] == [b]
    assert "no ACK for INVALIDATE n=1" in f.evicted[0][1]
    assert "it may have been applied" in f.evicted[0][1]
    assert inv.finished and f.mm.seq % 2 == 0 and inv.not_acked == ["b (session 2)"]


async def test_acks_in_time_cancel_the_deadline() -> None:
    f = Fanout(ack_deadline=0.02)
    a = f.session("a")
    inv = f.inv.begin(f.mm, page(0), Event.CLEAR)
    f.inv.on_ack(a, 1)
    await asyncio.sleep(0.05)
    assert inv.finished and f.evicted == []


async def test_a_reply_never_overtakes_a_queued_invalidate() -> None:
    f = Fanout()
    a = f.session("a")
    f.inv.begin(f.mm, page(0), Event.CLEAR)
    f.inv.begin(f.mm, page(1), Event.CLEAR)  # queued behind n=1 until the end of the tick
    assert f.inv.pending_for(a.mirrors[1], *page(1)[0])
    f.courier.reply(a.identity, a, Ok(), re=7)
    assert [type(m).__name__ for m in f.sender.to(a)] == ["Invalidate", "Invalidate", "Ok"]


async def test_announce_calls_then_once_every_event_completed() -> None:
    f = Fanout()
    a = f.session("a")
    done: list[bool] = []
    changes = [(*page(0)[0], Event.CLEAR), (*page(1)[0], Event.UNMAP)]
    f.inv.announce(f.mm, changes, then=lambda: done.append(True))
    await asyncio.sleep(0)
    assert done == [] and f.mm.active == 2
    f.inv.on_ack(a, f.inv.sent(a))
    assert done == [] and f.mm.active == 1  # the second waited for that ACK: sent now
    await asyncio.sleep(0)
    f.inv.on_ack(a, f.inv.sent(a))
    assert done == [True] and f.mm.active == 0


async def test_written_goes_only_to_mirrors_watching_writes() -> None:
    f = Fanout()
    a, b = f.session("a"), f.session("b")
    b.mirrors[2].watch_writes = True
    inv = f.inv.begin(f.mm, page(0), Event.WRITTEN)
    assert f.sender.to(a) == [] and len(f.sender.to(b)) == 1
    f.inv.on_ack(b, 1)
    assert inv.finished


async def test_a_session_forgiven_while_its_flush_is_pending_leaves_no_outbox_behind() -> None:
    """An INVALIDATE batched behind an unacked one schedules a flush for the next turn; a
    session that leaves (or is evicted) in between must not get a new outbox from that flush,
    which would keep the session object alive for good (found by review)."""
    f = Fanout()
    f.courier.window = 2
    s = f.session("a")
    f.inv.begin(f.mm, page(0), Event.CLEAR)  # sent at once: n=1 unacked
    f.inv.begin(f.mm, page(1), Event.CLEAR)  # batched: a flush is scheduled
    f.inv.forgive(s)  # the session leaves in the same turn
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert s not in f.courier.boxes
    assert [type(m) for m in f.sender.to(s)] == [Invalidate]


async def test_items_wait_for_the_ack_while_the_window_is_full_then_go_as_one() -> None:
    f = Fanout()  # the default window: one INVALIDATE in flight per session
    a, b = f.session("a"), f.session("b")
    first = f.inv.begin(f.mm, page(0), Event.CLEAR)
    later = [f.inv.begin(f.mm, page(i), Event.CLEAR) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    assert [m.n for m in f.sender.to(a)] == [1]  # held: the window is full
    # Held items are queued, so a DMA of their pages is still refused as pending.
    assert f.inv.pending_for(next(iter(a.mirrors.values())), *page(2)[0])
    f.inv.on_ack(a, 1)
    assert first.finished is False  # b has not acked
    assert [m.n for m in f.sender.to(a)] == [1]  # sent at the end of the ACK's tick
    await asyncio.sleep(0)
    sent = f.sender.to(a)
    assert [m.n for m in sent] == [1, 2] and len(sent[1].items) == 3
    assert [m.n for m in f.sender.to(b)] == [1]  # b's items still wait for b's ACK
    f.inv.on_ack(b, 1)
    await asyncio.sleep(0)
    f.inv.on_ack(a, 2)
    f.inv.on_ack(b, 2)
    assert first.finished and all(inv.finished for inv in later)
    assert f.mm.seq % 2 == 0 and f.inv.stray_acks == 0


async def test_a_reply_sends_held_items_first_whatever_the_window() -> None:
    f = Fanout()
    a = f.session("a")
    f.inv.begin(f.mm, page(0), Event.CLEAR)
    f.inv.begin(f.mm, page(1), Event.CLEAR)  # held behind n=1
    f.courier.reply(a.identity, a, Ok(), re=7)
    kinds = [type(m).__name__ for m in f.sender.to(a)]
    assert kinds == ["Invalidate", "Invalidate", "Ok"]


async def _held_batch_over_two_mirrors(
    version: tuple[int, int],
) -> tuple[Fanout, Session, Mm, Mirror]:
    """A session (whose hello said ``version``) with a second mirror over another mm (another
    target process): pages 1-3 of both invalidated while page 0's INVALIDATE is unacked,
    then that ACK, which releases the held batch."""
    f = Fanout()
    a = f.session("a")
    a.version = version
    mm2 = Mm(pid=2, start_time=1, view=cast(ProcessView, None), pidfd=-1)
    m2 = Mirror(50, a, mm2, [Span(LO, HI)], Access.READ)
    mm2.mirrors.append(m2)
    a.mirrors[m2.id] = m2
    f.inv.begin(f.mm, page(0), Event.CLEAR)  # in flight: what follows is held
    for i in (1, 2, 3):
        f.inv.begin(f.mm, page(i), Event.CLEAR)
        f.inv.begin(mm2, page(i), Event.CLEAR)
    f.inv.on_ack(a, 1)
    await asyncio.sleep(0)
    return f, a, mm2, m2


@pytest.mark.parametrize("version", [(1, 0), (1, 1)])
async def test_a_batch_over_several_mirrors_is_one_invalidate_per_mirror(
    version: tuple[int, int],
) -> None:
    """To a session whose hello said 1.1 or less (no ``Invalidate.mirrors``)."""
    f, a, mm2, m2 = await _held_batch_over_two_mirrors(version)
    sent = f.sender.to(a)[1:]
    assert [(m.mirror, len(m.items)) for m in sent] == [(a.id, 3), (m2.id, 3)]
    # Each mirror's items keep their order (seq rises within a mirror).
    for m in sent:
        assert [it[1] for it in m.items] == sorted(it[1] for it in m.items)
    f.inv.on_ack(a, 3)
    assert f.mm.seq % 2 == 0 and mm2.seq % 2 == 0


async def test_a_batch_over_several_mirrors_is_one_invalidate_to_a_1_2_session() -> None:
    """A session whose hello said 1.2 gets the held batch of two mirrors as one INVALIDATE,
    ``mirrors`` naming each item's mirror; one ACK of it completes both mms' invalidations."""
    f, a, mm2, m2 = await _held_batch_over_two_mirrors((1, 2))
    (sent,) = f.sender.to(a)[1:]
    assert sent.mirrors == (a.id,) * 3 + (m2.id,) * 3 and sent.mirror == a.id
    assert [it[1] for it in sent.items] == [LO + i * PAGE_SIZE for i in (1, 2, 3)] * 2
    assert f.mm.seq % 2 == 1 and mm2.seq % 2 == 1  # both still waiting for that ACK
    f.inv.on_ack(a, 2)
    assert f.mm.seq % 2 == 0 and mm2.seq % 2 == 0


async def test_a_session_forgiven_after_the_ack_that_released_its_items_keeps_no_outbox() -> None:
    f = Fanout()
    s = f.session("a")
    f.inv.begin(f.mm, page(0), Event.CLEAR)
    f.inv.begin(f.mm, page(1), Event.CLEAR)  # held behind n=1
    f.inv.on_ack(s, 1)  # schedules the held item's flush for the end of the tick
    f.inv.forgive(s)  # the session leaves in the same turn
    await asyncio.sleep(0)
    assert s not in f.courier.boxes and len(f.sender.to(s)) == 1


async def test_held_items_go_after_hold_max_without_an_ack() -> None:
    """An agent whose ACK waits on a long DMA fence still gets later INVALIDATEs: held items
    wait at most ``hold_max`` for the ACK, then go anyway."""
    f = Fanout()
    f.courier.hold_max = 0.02
    a = f.session("a")
    f.inv.begin(f.mm, page(0), Event.CLEAR)
    later = f.inv.begin(f.mm, page(1), Event.CLEAR)  # held behind n=1
    await asyncio.sleep(0.005)
    assert [m.n for m in f.sender.to(a)] == [1]
    await asyncio.sleep(0.05)
    assert [m.n for m in f.sender.to(a)] == [1, 2]
    f.inv.on_ack(a, 2)
    assert later.finished and f.mm.seq % 2 == 0
    assert not f.courier._held


async def test_an_ack_in_time_cancels_the_hold_timer() -> None:
    f = Fanout()
    a = f.session("a")
    f.inv.begin(f.mm, page(0), Event.CLEAR)
    f.inv.begin(f.mm, page(1), Event.CLEAR)
    assert a in f.courier._held
    f.inv.on_ack(a, 1)
    await asyncio.sleep(0)
    assert not f.courier._held and [m.n for m in f.sender.to(a)] == [1, 2]
    f.inv.begin(f.mm, page(2), Event.CLEAR)  # held again: a new timer
    f.inv.forgive(a)  # the session leaves: its timer goes with it
    assert not f.courier._held
