"""Knocks at a TCP door from another user of the same host, who holds no key.

Every user of a host knocks from the same addresses (all of 127.0.0.0/8), and the door
knew a TCP knock only by its address. So another user could name the port of someone
else's connection (the server dropped it and connected there instead), name ports nobody
answers from to fill places, and spread its knocks over 127.0.0.2, .3, ... to get 32 places
per address. Now a knock made on this host is its user's (``sockowner``, from
/proc/net/tcp): the user may name only a port it listens on itself, and holds at most
``per_peer`` places, from whatever address.

The attacker is a real second user running a plain socket script; the server is a real
``transport.Server`` with a real door, and its legitimate client a real ``Dialer`` (root).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pytest
import zmq
from hmmirror.transport import Dialer, DoorError, Limits, Server
from hmmirror.transport.door import read_reply_async

#: The attacker: knock as told, print each answer as a JSON line. argv: door port, then
#: a port to name ("name:PORT"), or "own:N:SOURCES" (N knocks, each naming a port of a
#: listening socket of its own, from the comma-separated source addresses in turn), or
#: "hold:N:SOURCES" (N knocks that never send their line, held until stdin closes), or
#: "drop:PORT" (name PORT and close the knock at once, before the door has read it), or
#: "ll:ADDR,IFINDEX,PORT" (name PORT, knocking from and to a link-local address).
ATTACK = r"""
import json, socket, sys
from hmmirror.testing.knock import knock_line
port = int(sys.argv[1])
door = ("127.0.0.1", port)
def knock(named, source="127.0.0.1"):
    return knock_line(port, f"channel {named}", source)
kind, _, rest = sys.argv[2].partition(":")
if kind == "ll":  # from the host's link-local address ADDR on interface IFINDEX, name PORT
    addr, index, named = rest.split(",")
    with socket.socket(socket.AF_INET6) as s:
        s.settimeout(5)
        s.bind((addr, 0, 0, int(index)))
        s.connect((addr, port, 0, int(index)))
        s.sendall(f"channel {named}\n".encode())
        print(json.dumps(s.makefile().readline().strip()), flush=True)
elif kind == "drop":  # the line sent, the socket closed at once: the knock is orphaned
    with socket.create_connection(door, timeout=5) as s:
        s.sendall(f"channel {rest}\n".encode())
    print(json.dumps("dropped"), flush=True)
elif kind == "hold":  # N silent knocks (no line sent), from the sources in turn, kept open
    n, _, sources = rest.partition(":")
    sources = sources.split(",")
    held = [socket.create_connection(door, timeout=5, source_address=(sources[i % len(sources)], 0))
            for i in range(int(n))]
    print(json.dumps("held"), flush=True)
    sys.stdin.read()
elif kind == "name":
    print(json.dumps(knock(int(rest))))
else:
    n, _, sources = rest.partition(":")
    sources = sources.split(",")
    mine = []
    for i in range(int(n)):
        source = sources[i % len(sources)]
        listener = socket.socket()
        listener.bind((source, 0))
        listener.listen()
        mine.append(listener)
        print(json.dumps(knock(listener.getsockname()[1], source)), flush=True)
"""


async def attack(user, port: int, how: str) -> list[str]:
    """Run the attacker as ``user``; its answers."""
    proc = await asyncio.create_subprocess_exec(
        *user.argv(sys.executable, "-c", ATTACK, str(port), how),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    return [json.loads(line) for line in out.decode().splitlines()]


async def test_another_local_user_can_neither_take_a_connection_nor_hold_many_places(make_user):
    mallory = make_user()
    seen: list[bytes] = []
    server = Server(
        "tcp://127.0.0.1:0",
        lambda conn, frames: seen.append(conn.rid),
        insecure=True,
        limits=Limits(per_peer=8, recycle_after=0.2),
    )
    ctx: zmq.Context[object] = zmq.Context()
    victim: Dialer | None = None
    try:
        server.start()
        port = int(server.endpoint.rsplit(":", 1)[1])
        victim = Dialer(ctx, server.endpoint)
        await victim.dial(5.0)
        (rid,) = server.connections
        theirs = int(victim.sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
        await asyncio.sleep(0.3)  # silent past recycle_after: only ownership protects it now
        (answer,) = await attack(mallory, port, f"name:{theirs}")
        assert f"uid {mallory.uid} does not listen on port {theirs}" in answer, answer
        assert list(server.connections) == [rid], "the victim's connection was taken"
        victim.sock.send(b"still mine")
        for _ in range(100):
            if rid in seen:
                break
            await asyncio.sleep(0.02)
        assert rid in seen, "the victim is still served"
        # Ports of its own, from four loopback addresses: 8 places in all, not 8 per address
        # (and none of them silent long enough to give way to the next).
        server.limits = replace(server.limits, recycle_after=60.0)
        answers = await attack(mallory, port, "own:12:127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5")
        assert answers[:8] == ["ok"] * 8, answers
        assert all(f"uid {mallory.uid} (on this host) has 8 connections" in a
                   for a in answers[8:]), answers  # fmt: skip
        # Root's own knocks are counted apart: the victim's side is not locked out.
        more = Dialer(ctx, server.endpoint)
        try:
            await more.dial(5.0)
        finally:
            more.close()
    finally:
        if victim is not None:
            victim.close()
        server.close()
        ctx.term()


async def test_another_local_user_cannot_keep_the_door_busy(make_user):
    """Knocks that never send their line wait at the door (2 s each, 64 at most in all).
    Counted per address, one user knocking from eight loopback addresses filled all 64
    and the door answered everyone else ``busy``; counted per user, it holds 8."""
    mallory = make_user()
    server = Server("tcp://127.0.0.1:0", lambda conn, frames: None, insecure=True)
    ctx: zmq.Context[object] = zmq.Context()
    holder = None
    try:
        server.start()
        port = int(server.endpoint.rsplit(":", 1)[1])
        sources = ",".join(f"127.0.0.{i}" for i in range(2, 10))
        holder = await asyncio.create_subprocess_exec(
            *mallory.argv(sys.executable, "-c", ATTACK, str(port), f"hold:64:{sources}"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), 30)
        assert json.loads(line) == "held", line
        client = Dialer(ctx, server.endpoint)
        try:
            await client.dial(1.5)  # within the held knocks' 2 s: the door is not busy
        finally:
            client.close()
        assert server.door is not None and server.door.counters["busy"] >= 64 - 8
    finally:
        if holder is not None and holder.returncode is None:
            holder.kill()
            await holder.wait()
        server.close()
        ctx.term()


async def test_a_knock_whose_socket_is_closed_before_the_door_reads_it_is_not_served(make_user):
    """The knock's line sent and its socket closed before the door accepted it: the kernel
    keeps the closed socket as a minisock (an orphaned FIN_WAIT2, then TIME_WAIT), whose
    uid reads 0. Taken at its word that made the knock root's, which may name any port: the
    victim's connection was dropped and its port connected to. Now a knock from this host
    whose socket is gone is not served."""
    mallory = make_user()
    server = Server(
        "tcp://127.0.0.1:0",
        lambda conn, frames: None,
        insecure=True,
        limits=Limits(recycle_after=0.1),
    )
    ctx: zmq.Context[object] = zmq.Context()
    victim: Dialer | None = None
    try:
        server.start()
        port = int(server.endpoint.rsplit(":", 1)[1])
        victim = Dialer(ctx, server.endpoint)
        await victim.dial(5.0)
        (rid,) = server.connections
        theirs = int(victim.sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
        await asyncio.sleep(0.2)  # silent past recycle_after: only the door protects it now
        attacker = subprocess.run(
            mallory.argv(sys.executable, "-c", ATTACK, str(port), f"drop:{theirs}"),
            capture_output=True,
            text=True,
            timeout=30,
        )  # fmt: skip  (blocking on purpose: the door reads nothing until the knock is closed)
        assert json.loads(attacker.stdout) == "dropped", attacker.stderr[-2000:]
        time.sleep(0.3)  # still blocking: the closed socket's FIN is acked, it is a minisock
        await asyncio.sleep(0.5)  # the door accepts and judges it now
        assert list(server.connections) == [rid], "an orphaned knock took the connection"
    finally:
        if victim is not None:
            victim.close()
        server.close()
        ctx.term()


def link_local() -> tuple[str, int] | None:
    """One of this host's IPv6 link-local addresses and its interface index, if any."""
    with open("/proc/net/if_inet6") as f:
        for line in f:
            hexaddr, index, _, scope, _, _name = line.split()
            if scope == "20":  # IPV6_ADDR_LINKLOCAL
                return str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))), int(index, 16)
    return None


async def test_a_knock_from_a_link_local_address_is_still_its_users(make_user):
    """A knock from the host's own link-local address: its socket is bound to the link's
    interface, which a lookup on no interface does not find, and the address cannot be
    bound without its scope, so the knock passed for a remote one: counted by address and
    free to name any port. Now the lookup is made on the source's scope."""
    found = link_local()
    if found is None:
        pytest.skip("no IPv6 link-local address on this host (/proc/net/if_inet6)")
    addr, index = found
    mallory = make_user()
    server = Server("tcp://[::]:0", lambda conn, frames: None, insecure=True)
    try:
        server.start()
        port = int(server.endpoint.rsplit(":", 1)[1])
        with socket.socket() as roots:  # a port root listens on, that mallory names
            roots.bind(("127.0.0.1", 0))
            roots.listen()
            (answer,) = await attack(mallory, port, f"ll:{addr},{index},{roots.getsockname()[1]}")
        assert f"uid {mallory.uid} does not listen on port" in answer, answer
        assert not server.connections
    finally:
        server.close()


#: Another user's peer at a client's port: connect a DEALER, say "in" once connected (or
#: "out" if it is not within 2 s), then report what it received. argv: the port.
PEER = r"""
import json, sys, zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.setsockopt(zmq.IMMEDIATE, 1)  # POLLOUT once connected, not at once
sock.connect(f"tcp://127.0.0.1:{sys.argv[1]}")
connected = bool(sock.poll(2000, zmq.POLLOUT))
print(json.dumps("in" if connected else "out"), flush=True)
got = []
while connected and sock.poll(2000):
    got.append(sock.recv().decode(errors="replace"))
print(json.dumps(got), flush=True)
sock.close()
ctx.term()
"""


async def test_nobody_can_connect_to_a_clients_port_once_the_server_has(make_user):
    """A TCP client's DEALER binds a port for the server to connect to, and its port is
    there for all to see (``ss -ltn``). Before, anyone could connect to it as well: in plain
    TCP another user's peer then got its share of the client's requests (the DEALER spreads
    them over its connections), and with CURVE a relay of a second server connection made
    the client send part of its traffic into a pipe the relay could drop. Now the port's
    listening socket drops every packet once the server is connected."""
    mallory = make_user()
    seen: list[bytes] = []
    server = Server(
        "tcp://127.0.0.1:0", lambda conn, frames: seen.append(frames[0].bytes), insecure=True
    )
    ctx: zmq.Context[object] = zmq.Context()
    victim: Dialer | None = None
    try:
        server.start()
        victim = Dialer(ctx, server.endpoint)
        await victim.dial(5.0)
        theirs = int(victim.sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
        snoop = await asyncio.create_subprocess_exec(
            *mallory.argv(sys.executable, "-c", PEER, str(theirs)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.sleep(0.5)  # the snoop is connecting (or trying to)
        for i in range(10):
            victim.sock.send(f"request {i}".encode(), zmq.NOBLOCK)
        out, err = await asyncio.wait_for(snoop.communicate(), 30)
        assert snoop.returncode == 0, err.decode()[-2000:]
        reached, got = (json.loads(line) for line in out.decode().splitlines())
        assert (reached, got) == ("out", []), f"another user's peer got {got} ({reached})"
        for _ in range(100):
            if len(seen) == 10:
                break
            await asyncio.sleep(0.02)
        assert seen == [f"request {i}".encode() for i in range(10)], seen
    finally:
        if victim is not None:
            victim.close()
        server.close()
        ctx.term()


class FakeDoor:
    """A plain TCP listener that plays a server's door: the test reads each knock, and
    decides who connects to the port it names, and what the door answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.setblocking(False)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"

    async def knock(self) -> tuple[socket.socket, int]:
        """The next knock: its connection (answer it with ``answer``) and the port named."""
        conn, _ = await asyncio.get_running_loop().sock_accept(self.sock)
        line = await read_reply_async(conn)  # one line, as the door reads a knock's
        return conn, int(line.split()[1])

    @staticmethod
    async def answer(conn: socket.socket, line: bytes) -> None:
        with conn:
            await asyncio.get_running_loop().sock_sendall(conn, line)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Dialing:
    """A FakeDoor, a context and a Dialer that knocks at the door, and the test's own DEALERs
    (``socket``); all closed when the test ends."""

    door: FakeDoor
    ctx: zmq.Context[object]
    client: Dialer
    own: list[zmq.Socket[object]] = field(default_factory=list)

    def socket(self) -> zmq.Socket[object]:
        """A DEALER of the test's own in the same context. ``IMMEDIATE``: without it a
        connecting DEALER can send at once, and ``connected`` would not wait at all."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        self.own.append(sock)
        return sock


@pytest.fixture
def dialing() -> Iterator[Dialing]:
    """A ``Dialing``, closed afterwards: the Dialer, the test's sockets, the context, the door."""
    door = FakeDoor()
    ctx: zmq.Context[object] = zmq.Context()
    d = Dialing(door, ctx, Dialer(ctx, door.endpoint))
    try:
        yield d
    finally:
        d.client.close()
        for sock in d.own:
            sock.close(linger=0)
        ctx.term()
        door.close()


async def connected(sock: zmq.Socket[object], deadline: float = 10.0) -> None:
    """Until ``sock`` (a connecting ``IMMEDIATE`` DEALER) can send: its connection is made
    and its handshake done. Fails after ``deadline`` seconds."""
    async with asyncio.timeout(deadline):
        while not sock.poll(0, zmq.POLLOUT):
            await asyncio.sleep(0.01)


async def test_a_dial_during_which_another_connection_got_in_fails(dialing: Dialing):
    """If another connection reaches the client's port before the server's (a relay racing
    the dial), the dial fails rather than leave the client sending into it. The door here
    lets that connection in first, then connects as the server."""
    door, client = dialing.door, dialing.client
    intruder, posing = dialing.socket(), dialing.socket()

    async def serve_one() -> None:
        conn, port = await door.knock()
        for sock in (intruder, posing):  # the intruder first, then "the server"
            sock.connect(f"tcp://127.0.0.1:{port}")
            await connected(sock)
        await door.answer(conn, b"ok\n")

    serving = asyncio.ensure_future(serve_one())
    with pytest.raises(DoorError, match="2 connections reached this client's port"):
        await client.dial(5.0)
    await serving
    assert client.closed, "the DEALER the intruder reached is closed, never used again"


async def test_an_intruder_alone_at_a_clients_port_is_not_taken_for_the_server(
    make_user, dialing: Dialing
):
    """Another user connects to the client's port before the server, and the server never
    does: the client's DEALER can send (through the intruder), and it once counted one
    connection and took it. Now, from a server on this host, the one connection must come
    from the user the door belongs to."""
    mallory = make_user()
    door, client = dialing.door, dialing.client
    intruder: asyncio.subprocess.Process | None = None

    async def serve_one() -> None:
        nonlocal intruder
        conn, port = await door.knock()
        intruder = await asyncio.create_subprocess_exec(
            *mallory.argv(sys.executable, "-c", PEER, str(port)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert intruder.stdout is not None
        assert json.loads(await asyncio.wait_for(intruder.stdout.readline(), 30)) == "in"
        await door.answer(conn, b"ok\n")

    try:
        serving = asyncio.ensure_future(serve_one())
        with pytest.raises(DoorError, match="is not the server's"):
            await client.dial(5.0)
        await serving
        assert client.closed
        assert intruder is not None and intruder.stdout is not None
        got = json.loads(await asyncio.wait_for(intruder.stdout.readline(), 30))
        assert got == [], got
    finally:
        if intruder is not None and intruder.returncode is None:
            intruder.kill()
            await intruder.wait()


async def test_a_client_that_knocks_again_keeps_one_port_and_closes_it(dialing: Dialing):
    """A busy door, knocked at again: the client names the same port, so that once the
    server is connected the one listener is filtered. Before, each knock bound a new
    listener on the DEALER, and the earlier ones stayed open to anyone."""
    door, client = dialing.door, dialing.client
    server = dialing.socket()
    named: list[int] = []

    async def serve_two() -> None:
        conn, port = await door.knock()
        named.append(port)
        await door.answer(conn, b"error busy: try again\n")
        conn, port = await door.knock()
        named.append(port)
        server.connect(f"tcp://127.0.0.1:{port}")
        await connected(server)
        await door.answer(conn, b"ok\n")

    serving = asyncio.ensure_future(serve_two())
    await client.dial(5.0)
    await serving
    assert len(named) == 2 and named[0] == named[1], named
    with socket.socket() as anyone:
        anyone.settimeout(1.0)
        with pytest.raises(OSError):  # the filter drops its SYN: no answer, ever
            anyone.connect(("127.0.0.1", named[0]))


async def test_a_dial_that_failed_closes_its_port(dialing: Dialing):
    """The door said ok but the server's connection did not come in time: the dial fails,
    and its Dialer is closed, so that the next knock comes from a new one with a new port.
    Before, the channel dialled again on the same Dialer, naming the same port, which the
    server, connected to it late, then refused as connected already for a minute."""
    door, client = dialing.door, dialing.client

    async def answer_and_stay_away() -> None:
        conn, _ = await door.knock()
        await door.answer(conn, b"ok\n")

    serving = asyncio.ensure_future(answer_and_stay_away())
    with pytest.raises(DoorError, match="did not connect back"):
        await client.dial(0.5)
    await serving
    assert client.closed, "a failed dial's Dialer, and the port it named, are closed"
