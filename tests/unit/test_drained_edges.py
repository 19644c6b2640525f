"""``transport.Drained`` never strands a message behind an edge its own send consumed.

``zmq.FD`` is edge-triggered, and a send may process the socket's commands, taking the
"a message arrived" edge with it (pyzmq #1177). The drain loop's first look is the
``recv`` itself, and ``_sent`` reads ``EVENTS`` right after a send made outside it:
a message that arrived just before our send must still be handed on. Real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import zmq
from hmmirror.transport import Drained
from hmmirror.transport.sockets import DRAIN_BUDGET, send_frames


class Collector(Drained):
    """A DEALER on the loop that keeps what it receives."""

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self.got: list[bytes] = []
        self.arrived = asyncio.Event()
        self._watch(sock)

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        self.got.append(b"".join(f.bytes for f in frames))
        self.arrived.set()

    def send(self, frames: list[bytes]) -> None:
        try:
            send_frames(self.sock, frames, True)
        finally:
            self._sent()


@contextlib.contextmanager
def dealers(tmp_path: Any, name: str) -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    """Two connected DEALERs (ours bound on ``name``, the peer's connected), closed after."""
    ctx: zmq.Context[zmq.Socket[Any]] = zmq.Context()
    ours, peer = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        ours.linger = peer.linger = 0
        ours.bind(f"ipc://{tmp_path}/{name}")
        peer.connect(f"ipc://{tmp_path}/{name}")
        yield ours, peer
    finally:
        ours.close(0)
        peer.close(0)
        ctx.term()


async def test_a_message_that_arrives_before_our_send_is_not_stranded(tmp_path: Any) -> None:
    with dealers(tmp_path, "edge.sock") as (ours, peer):
        line = Collector(ours)
        # The connection is up once a first round trip went through.
        peer.send(b"hello")
        await asyncio.wait_for(line.arrived.wait(), 5)
        for i in range(200):
            line.arrived.clear()
            want = b"m%d" % i
            # The peer's message is queued on our socket while the loop is not looking
            # (no await between); then we send, which may take its edge.
            peer.send_multipart([b"", want])
            time.sleep(0.002 if i % 2 else 0)  # with and without the I/O thread done
            line.send([b"", b"x%d" % i])
            await asyncio.wait_for(line.arrived.wait(), 5)
            assert line.got[-1] == want
            assert peer.recv_multipart() == [b"", b"x%d" % i]
        assert len(line.got) == 201


async def test_messages_queued_before_the_reader_and_in_bursts_are_all_drained(
    tmp_path: Any,
) -> None:
    with dealers(tmp_path, "burst.sock") as (ours, peer):
        for i in range(50):  # before anyone watches the socket
            peer.send_multipart([b"", b"early%d" % i])
        time.sleep(0.05)
        line = Collector(ours)
        for burst in range(20):
            for i in range(burst):
                peer.send_multipart([b"", b"b%d.%d" % (burst, i)])
            await asyncio.sleep(0)
        deadline = time.monotonic() + 5
        want = 50 + sum(range(20))
        while len(line.got) < want and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(line.got) == want
        assert line.got[:50] == [b"early%d" % i for i in range(50)]


async def test_a_full_queue_is_drained_in_turns_that_let_the_loop_run(tmp_path: Any) -> None:
    """A drain handled messages for as long as they queued: a peer that kept the queue full
    kept the loop in one callback, and no timer or other socket ran meanwhile. Now each
    turn handles ``DRAIN_BUDGET`` at most, and every message is still handled, in order."""
    with dealers(tmp_path, "full.sock") as (ours, peer):
        count = 4 * DRAIN_BUDGET + 7
        for i in range(count):
            peer.send_multipart([b"", b"f%d" % i])
        time.sleep(0.2)  # all of them queued on our side before anyone looks
        line = Collector(ours)
        seen_between: list[int] = []

        def tick() -> None:  # another callback of the loop: it runs between turns
            seen_between.append(len(line.got))
            if len(line.got) < count:
                asyncio.get_running_loop().call_soon(tick)

        asyncio.get_running_loop().call_soon(tick)
        deadline = time.monotonic() + 5
        while len(line.got) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert line.got == [b"f%d" % i for i in range(count)]
        # The other callback ran while messages were still waiting, turn after turn (the
        # FD's reader and the drain's own recall may both run in one turn of the loop).
        partial = sorted({n for n in seen_between if 0 < n < count})
        assert len(partial) >= 2, seen_between
        assert partial[0] <= DRAIN_BUDGET, seen_between
