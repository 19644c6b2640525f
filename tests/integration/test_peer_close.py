"""Closing an RDMA requester while it dials: ``close`` returns at once, and the requests that
waited on the dial fail with DaemonUnavailable, as any request on a closed connection does.

Before, a CURVE dial's handshake monitor (a PAIR socket in the peer's context) was closed
only by the dial's own ``finally``, which a cancelled dial reaches on a later turn of the
loop, while ``close`` terminated the context at once: ``zmq_ctx_term`` then waited for that
socket with the loop blocked, for good. And a request waiting on the cancelled dial raised
CancelledError in a task nobody had cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from hmmirror.client.errors import DaemonUnavailable
from hmmirror.client.mlx5 import RdmaPeer
from hmmirror.proto.messages import Goodbye
from hmmirror.testing.rdma import Agent, hm_agent

PAGE = 4096
#: How long ``close`` may take before the test calls it stuck.
CLOSE_LIMIT = 5.0


@contextlib.contextmanager
def stopped(agent: Agent) -> Iterator[None]:
    """The agent stopped (SIGSTOP): a knock waits unanswered until it is continued."""
    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)


def close_within_limit(peer: RdmaPeer) -> float:
    """``peer.close()``; how long it took. If it is still blocked after ``CLOSE_LIMIT``, a
    watchdog thread closes every socket of the peer's context (what ``zmq_ctx_term`` waits
    for) so that the test can fail rather than hang."""
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(CLOSE_LIMIT):
            for sock in list(peer.ctx._sockets):  # pyzmq's own record of the context's sockets
                with contextlib.suppress(Exception):
                    sock.close(linger=0)

    threading.Thread(target=watchdog, daemon=True).start()
    started = time.monotonic()
    try:
        peer.close()
    finally:
        done.set()
    return time.monotonic() - started


async def read_pending(peer: RdmaPeer, rkey: int, addr: int) -> asyncio.Future[object]:
    """A READ that is waiting on a dial (the agent is stopped)."""
    reader = asyncio.ensure_future(peer.read(rkey, addr, 10))
    await asyncio.sleep(0.3)
    assert not reader.done(), "the READ should be waiting on the dial"
    return reader


@pytest.mark.parametrize("listen", ["curve", "insecure"])
async def test_closing_a_requester_during_its_first_dial(hmmd, puppet, listen):
    addr = await puppet.mmap(PAGE)
    async with hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{PAGE}:r",
                        insecure=listen == "insecure") as agent:  # fmt: skip
        (rkey,) = agent.rkeys
        peer = RdmaPeer(agent.endpoint, 5.0, agent.curve)
        with stopped(agent):
            reader = await read_pending(peer, rkey, addr)
            took = close_within_limit(peer)
            assert took < 1.0, f"close() took {took:.1f} s during a {listen} dial"
            with pytest.raises(DaemonUnavailable, match="closed"):
                await reader


@pytest.mark.parametrize("listen", ["curve", "insecure"])
async def test_closing_a_requester_while_it_knocks_again(hmmd, puppet, listen):
    """The agent closed the connection (a ``goodbye``); the next READ knocks again, and the
    requester is closed while that knock waits."""
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"still here")
    async with hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{PAGE}:r",
                        insecure=listen == "insecure") as agent:  # fmt: skip
        (rkey,) = agent.rkeys
        peer = RdmaPeer(agent.endpoint, 5.0, agent.curve)
        try:
            assert bytes(await peer.read(rkey, addr, 10)) == b"still here"
            await peer.request(Goodbye(), timeout=5.0)
            await asyncio.sleep(1.0)  # the agent's close reaches our socket
        except BaseException:
            peer.close()
            raise
        first = peer.sock
        with stopped(agent):
            reader = await read_pending(peer, rkey, addr)
            assert peer.sock is not first, "the READ did not knock again"
            took = close_within_limit(peer)
            assert took < 1.0, f"close() took {took:.1f} s during a {listen} knock"
            with pytest.raises(DaemonUnavailable, match="closed"):
                await reader
