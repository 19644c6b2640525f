"""A raw protocol peer: one ZeroMQ connection to hmmd driven message by message.

Tests that pin the wire itself (SPEC.md's fine print, the tracer, an agent that
never acks) need a peer with nothing of the client library between the socket and
the assertion. :class:`RawPeer` is a DEALER that sends what it is told, when it is
told, and sorts what comes back: a reply goes to the request whose id its ``re``
names, everything else (INVALIDATE, EVICTED, a reply nobody waits for) is queued
in order for :meth:`RawPeer.recv`. It heartbeats only when asked
(``hello(..., heartbeat=True)``): a peer that does not lets its lease lapse, which
some tests want. :func:`raw_peer` opens one for an ``async with`` and closes it
after.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import zmq
import zmq.asyncio
from hmmirror.proto.codec import Envelope, decode, encode
from hmmirror.proto.messages import (
    Fault,
    FaultReply,
    Heartbeat,
    Hello,
    Invalidate,
    Message,
    Register,
    Registered,
    Status,
    StatusReply,
    Welcome,
)
from hmmirror.transport import dial

__all__ = ["HEARTBEAT_INTERVAL", "POPULATE", "REPLY_TIMEOUT", "RawPeer", "raw_peer"]

#: Default seconds a peer waits for a reply or an unsolicited message.
REPLY_TIMEOUT = 5.0
#: Seconds between two heartbeats of a peer that heartbeats.
HEARTBEAT_INTERVAL = 0.1
#: ``fault.mode`` of a POPULATE fault (SPEC §4.2).
POPULATE = 1


class RawPeer:
    """A hand-driven agent connection: replies by ``re``, everything else queued in order.

    ``timeout`` is the default wait of every method that takes one.
    """

    def __init__(self, endpoint: str, timeout: float = REPLY_TIMEOUT) -> None:
        self.ctx = zmq.asyncio.Context()
        # dial() is typed for plain sockets; on an asyncio context it makes an asyncio one.
        self.sock = cast(zmq.asyncio.Socket, dial(self.ctx, endpoint))
        self.timeout = timeout
        self.next_id = 0
        self.replies: dict[int, asyncio.Future[Envelope]] = {}
        self.unsolicited: asyncio.Queue[Envelope] = asyncio.Queue()
        #: Ids of heartbeats sent and not answered yet: their acks are dropped, not queued.
        self.beats: set[int] = set()
        self.tasks = [asyncio.ensure_future(self._read())]

    async def _read(self) -> None:
        while True:
            env = decode(await self.sock.recv_multipart())
            if env.re in self.beats:
                self.beats.discard(env.re)
                continue
            fut = self.replies.get(env.re) if env.re else None
            if fut is not None and not fut.done():
                fut.set_result(env)
            else:
                self.unsolicited.put_nowait(env)

    async def _beat(self) -> None:
        while True:
            self.next_id += 1
            self.beats.add(self.next_id)
            self.sock.send_multipart(encode(Heartbeat(), self.next_id), zmq.NOBLOCK)
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    def _wait(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    # --- sending and receiving -----------------------------------------------------------------

    def send(self, msg: Message, bulk: Sequence[Any] = (), id: int | None = None) -> int:
        """Send ``msg`` under a fresh id (or ``id``) without waiting; return the id."""
        if id is None:
            self.next_id += 1
            id = self.next_id
        self.replies[id] = asyncio.get_running_loop().create_future()
        self.sock.send_multipart(encode(msg, id, bulk=bulk), zmq.NOBLOCK)
        return id

    async def reply(self, id: int, timeout: float | None = None) -> Envelope:
        """The reply to request ``id``; a wait that times out leaves it to be waited for again."""
        async with asyncio.timeout(self._wait(timeout)):
            env = await asyncio.shield(self.replies[id])
        del self.replies[id]
        return env

    async def request(
        self, msg: Message, bulk: Sequence[Any] = (), timeout: float | None = None
    ) -> Envelope:
        """Send ``msg`` and return its reply."""
        return await self.reply(self.send(msg, bulk), timeout)

    async def send_frames(self, frames: list[bytes], timeout: float | None = None) -> Envelope:
        """Send hand-made frames; return the next unsolicited message (their answer)."""
        self.sock.send_multipart(frames, zmq.NOBLOCK)
        return await self.recv(timeout)

    async def recv(self, timeout: float | None = None) -> Envelope:
        """The next unsolicited message (an invalidate, evicted, or an uncorrelated reply)."""
        async with asyncio.timeout(self._wait(timeout)):
            return await self.unsolicited.get()

    async def quiet(self, seconds: float) -> None:
        """Assert nothing unsolicited reaches this peer for ``seconds``."""
        try:
            env = await self.recv(seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected {env.type}: {env.msg}")

    # --- the protocol's steps ------------------------------------------------------------------

    async def hello(self, name: str = "raw", *, heartbeat: bool = False) -> Welcome:
        """Open a session as ``name``; with ``heartbeat``, keep its lease from then on."""
        env = await self.request(Hello(agent=name))
        assert isinstance(env.msg, Welcome), env.msg
        if heartbeat:
            self.tasks.append(asyncio.ensure_future(self._beat()))
        return env.msg

    async def register(self, pid: int, lo: int, hi: int, access: int = 3) -> int:
        """Register [lo, hi) of ``pid``; return the mirror id."""
        env = await self.request(
            Register(pid=pid, start_time=0, intervals=((lo, hi),), access=access)
        )
        assert isinstance(env.msg, Registered), env.msg
        return env.msg.mirror

    async def populate(self, mirror: int, start: int, npages: int, write: bool = False) -> bytes:
        """A POPULATE fault; returns its entries frame."""
        msg = Fault(mirror=mirror, start=start, npages=npages, write=write, mode=POPULATE)
        env = await self.request(msg)
        assert isinstance(env.msg, FaultReply), env.msg
        return bytes(env.bulk[0])

    async def invalidate(self, timeout: float | None = None, *, skip: bool = False) -> Invalidate:
        """The next unsolicited message, which must be an INVALIDATE; with ``skip``, the next
        INVALIDATE, whatever comes before it (each message waited for up to ``timeout``)."""
        while True:
            env = await self.recv(timeout)
            if skip and not isinstance(env.msg, Invalidate):
                continue
            assert isinstance(env.msg, Invalidate), env.msg
            return env.msg

    async def stats(self) -> dict[str, Any]:
        """hmmd's ``status`` figures."""
        env = await self.request(Status())
        assert isinstance(env.msg, StatusReply), env.msg
        return dict(env.msg.stats)

    def close(self) -> None:
        """Stop reading (and heartbeating) and close the connection."""
        for task in self.tasks:
            task.cancel()
        self.sock.close(0)
        self.ctx.term()


@contextlib.asynccontextmanager
async def raw_peer(endpoint: str, timeout: float = REPLY_TIMEOUT) -> AsyncIterator[RawPeer]:
    """A :class:`RawPeer` on ``endpoint`` for the block, closed after it."""
    peer = RawPeer(endpoint, timeout)
    try:
        yield peer
    finally:
        peer.close()
