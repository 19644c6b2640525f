"""A peer's connection places: one address or uid holds at most ``Limits.per_peer`` at once.

A requester that closes its connection gives the place back at once with ``goodbye``
(SPEC §4.7, 1.2); one that died, or closed without a word, gets it back once that
connection has been silent for ``Limits.recycle_after`` and the peer knocks again. Before
either, the 33rd connection of a requester that connected and closed 32 times was refused
for as long as hm-agent ran.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import zmq
from hmmirror.proto.messages import Goodbye
from hmmirror.testing.knock import knock_line
from hmmirror.testing.rdma import hm_agent
from hmmirror.transport import Dialer, DoorError, Limits, Server

PAGE = 4096


async def test_a_requester_that_connects_again_and_again_is_never_locked_out(hmmd, puppet):
    """Forty connections in a row, each closed by ``RdmaPeer.connect``'s exit, past the 32
    places of the address: every one is served."""
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"still here")
    async with hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{PAGE}:r") as agent:
        (rkey,) = agent.rkeys
        for i in range(40):
            async with agent.peer() as peer:
                got = bytes(await peer.read(rkey, addr, 10))
            assert got == b"still here", f"connection {i}"


async def test_a_silent_connection_gives_its_place_to_the_same_peers_next_one():
    """Real door, real sockets: with 2 places, a third knock is refused while both
    connections are fresh, and admitted once the older has been silent ``recycle_after``;
    that one is dropped, the other kept, and the new one is served."""
    seen: list[bytes] = []
    server = Server(
        "tcp://127.0.0.1:0",
        lambda conn, frames: seen.append(conn.rid),
        insecure=True,
        limits=Limits(per_peer=2, recycle_after=0.5),
    )
    ctx: zmq.Context[object] = zmq.Context()
    dialers: list[Dialer] = []
    try:
        server.start()
        for _ in range(2):
            dialers.append(Dialer(ctx, server.endpoint))
            await dialers[-1].dial(5.0)
        first, second = list(server.connections)
        dialers[1].sock.send(b"keeps it fresh")  # the second is heard from later
        third = Dialer(ctx, server.endpoint)
        dialers.append(third)
        started = time.monotonic()
        with pytest.raises(DoorError, match="has 2 connections, the most one may have"):
            await third.dial(5.0)
        await asyncio.sleep(max(0.0, 0.6 - (time.monotonic() - started)))
        dialers[1].sock.send(b"still fresh")
        await asyncio.sleep(0.05)
        assert seen.count(second) == 2, "the second connection was heard from"
        fresh = Dialer(ctx, server.endpoint)
        dialers.append(fresh)
        await fresh.dial(5.0)
        assert first not in server.connections, "the silent one gave its place"
        assert second in server.connections, "the one heard from lately kept its place"
        (new,) = set(server.connections) - {second}
        fresh.sock.send(b"served")
        for _ in range(100):
            if new in seen:
                break
            await asyncio.sleep(0.02)
        assert new in seen, "the new connection is served"
        # The client of the dropped connection is told at its next send: no peer, EAGAIN.
        refused = False
        for _ in range(100):
            try:
                dialers[0].sock.send(b"anyone?", zmq.NOBLOCK)
            except zmq.Again:
                refused = True
                break
            await asyncio.sleep(0.02)
        assert refused, "a send on the dropped connection was queued, not refused"
    finally:
        for d in dialers:
            d.close()
        server.close()
        ctx.term()


async def knock_raw(endpoint: str, line: str) -> str:
    """One knock at a TCP door, as anyone at the address can make it; the door's answer."""
    return await asyncio.to_thread(knock_line, int(endpoint.rsplit(":", 1)[1]), line)


async def test_a_knock_naming_a_live_connections_port_does_not_take_it_away():
    """A stranger at the same address names the port of a connection that is live: the knock
    is refused and the connection kept. Before, the server dropped that connection and
    connected to the port again, before anyone was authenticated. Once the connection has been
    silent for ``recycle_after`` (a client that died, its port bound again), it gives way."""
    seen: list[bytes] = []
    server = Server(
        "tcp://127.0.0.1:0",
        lambda conn, frames: seen.append(conn.rid),
        insecure=True,
        limits=Limits(recycle_after=0.5),
    )
    ctx: zmq.Context[object] = zmq.Context()
    victim: Dialer | None = None
    try:
        server.start()
        victim = Dialer(ctx, server.endpoint)
        await victim.dial(5.0)
        (rid,) = server.connections
        port = victim.sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1]
        answer = await knock_raw(server.endpoint, f"channel {port}")
        assert "is connected already" in answer, answer
        assert list(server.connections) == [rid], "the live connection was taken away"
        victim.sock.send(b"still mine")
        for _ in range(100):
            if rid in seen:
                break
            await asyncio.sleep(0.02)
        assert rid in seen, "the victim's connection still serves it"
        await asyncio.sleep(0.6)  # silent past recycle_after
        answer = await knock_raw(server.endpoint, f"channel {port}")
        assert answer.startswith("ok"), answer
        assert rid not in server.connections and len(server.connections) == 1
    finally:
        if victim is not None:
            victim.close()
        server.close()
        ctx.term()


def closed_port() -> int:
    """A local TCP port nobody listens on (bound for a moment, then closed)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return int(port)


async def wait_heard(seen: list[bytes], count: int) -> None:
    for _ in range(250):
        if len(seen) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{len(seen)} messages arrived, not {count}")


async def test_knocks_that_lead_nowhere_give_their_places_to_knocks_that_need_them():
    """Knocks that name ports nobody answers from (no key, no listener: what anyone at any
    address can send) fill every place. Once they have sent nothing for
    ``first_message_within``, a client's knock that needs a place gets one and they are
    dropped; a connection that was heard from keeps its place however old, and a knock that
    needs no place drops nothing. Before, such knocks held their places for as long as the
    server ran: hm-agent, which has no idle sweep, refused everyone for good."""
    seen: list[bytes] = []
    server = Server(
        "tcp://127.0.0.1:0",
        lambda conn, frames: seen.append(conn.rid),
        insecure=True,
        limits=Limits(total=4, first_message_within=1.5),
    )
    ctx: zmq.Context[object] = zmq.Context()
    dialers: list[Dialer] = []

    async def dial() -> Dialer:
        dialers.append(Dialer(ctx, server.endpoint))
        await dialers[-1].dial(5.0)
        return dialers[-1]

    try:
        server.start()
        (await dial()).sock.send(b"heard")
        await wait_heard(seen, 1)
        (heard,) = seen
        made = time.monotonic()
        for _ in range(2):
            answer = await knock_raw(server.endpoint, f"channel {closed_port()}")
            assert answer == "ok", answer
        nowhere = set(server.connections) - {heard}
        assert len(nowhere) == 2
        await dial()
        assert len(server.connections) == 4
        with pytest.raises(DoorError, match="too many connections"):
            await dial()
        assert time.monotonic() - made < 1.5, "too slow to tell: the machine is overloaded"
        await asyncio.sleep(1.6)
        await dial()  # needs a place: the three that sent nothing give theirs
        assert heard in server.connections and not nowhere & set(server.connections)
        assert len(server.connections) == 2
        await asyncio.sleep(1.6)
        await dial()  # needs no place: the silent one made before it stays
        assert len(server.connections) == 3
    finally:
        for d in dialers:
            d.close()
        server.close()
        ctx.term()


async def test_a_requester_whose_connection_the_agent_closed_knocks_again(hmmd, puppet):
    """The agent closed the connection (here after a ``goodbye`` sent by hand; after 60 s of
    silence at the cap it does so by itself): the next READ is refused by our own socket
    (no peer), and goes again, once, on a new connection."""
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"still here")
    async with (
        hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{PAGE}:r") as agent,
        agent.peer() as peer,
    ):
        (rkey,) = agent.rkeys
        assert bytes(await peer.read(rkey, addr, 10)) == b"still here"
        await peer.request(Goodbye(), timeout=5.0)  # answered, then the agent closes its end
        await asyncio.sleep(1.0)  # the close reaches our socket
        assert bytes(await peer.read(rkey, addr, 10)) == b"still here"
        assert bytes(await peer.read(rkey, addr + 6, 4)) == b"here"
        # Eight requests find the next closed connection at once: one knock serves them all.
        await peer.request(Goodbye(), timeout=5.0)
        await asyncio.sleep(1.0)
        before = peer.sock
        reads = await asyncio.gather(*(peer.read(rkey, addr + i, 1) for i in range(8)))
        assert b"".join(bytes(r) for r in reads) == b"still he"
        assert peer.sock is not before
