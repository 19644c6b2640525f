"""A flood of knocks at hm-agent's TCP door, from many loopback addresses, naming ports nobody
answers from: no key and no listener needed. (Another local user may now name only ports it
listens on, and holds 32 places in all: ``test_local_knocks``; root may name any port.)

Before, each knock became a connection that held its place for as long as hm-agent ran (it
has no idle sweep), and its cap (1007, from libzmq's socket table) was above what its
descriptors allowed: under a unit's default limit of 1024 the door met EMFILE, and every
requester was refused for good. Now the cap follows RLIMIT_NOFILE (``fd_room``), hm-agent
raises its soft limit to the hard one, and a connection that sent nothing within
``first_message_within`` (3 s) gives its place to a knock that needs one.

hm-agent runs here under ``prlimit --nofile=300:300`` (room for 14 connections), and the
flood comes from root, whose local knocks count as one user's (32 places) whatever loopback
address they come from: the descriptors are the tighter bound.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest
from hmmirror.testing import rdma
from hmmirror.testing.knock import knock_line
from hmmirror.testing.rdma import hm_agent
from hmmirror.transport.server import FD_RESERVE, FDS_PER_CONNECTION

PAGE = 4096
NOFILE = 300
#: Loopback addresses the flood comes from, 32 knocks each (the per-address cap).
SOURCES = [f"127.0.0.{i}" for i in range(2, 8)]


def knock(port: int, source: str, dead: list[socket.socket]) -> str:
    """One knock at the door on ``port`` from ``source``, naming a port nobody answers from
    (bound, not listening, and kept in ``dead`` so that no two knocks name the same)."""
    probe = socket.socket()
    probe.bind((source, 0))
    dead.append(probe)
    return knock_line(port, f"channel {probe.getsockname()[1]}", source)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(120)
async def test_a_knock_flood_from_many_addresses_cannot_lock_hm_agent(hmmd, puppet, monkeypatch):
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"still here")
    monkeypatch.setattr(
        rdma, "HM_AGENT", ["prlimit", f"--nofile={NOFILE}:{NOFILE}", *rdma.HM_AGENT]
    )
    async with hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{PAGE}:r") as agent:
        (rkey,) = agent.rkeys
        port = int(agent.endpoint.rsplit(":", 1)[1])
        cap = (NOFILE - FD_RESERVE) // FDS_PER_CONNECTION
        answers: list[str] = []
        dead: list[socket.socket] = []
        flood_started = time.monotonic()
        try:
            for source in SOURCES:
                answers += await asyncio.to_thread(
                    lambda s=source: [knock(port, s, dead) for _ in range(32)]
                )
        finally:
            for probe in dead:
                probe.close()
        flood_ended = time.monotonic()
        # Past first_message_within, a knock needing a place would take an early one's.
        assert flood_ended - flood_started < 3.0, "too slow to tell: the machine is overloaded"
        admitted = answers.count("ok")
        refused = [a for a in answers if a != "ok"]
        assert admitted == cap, (admitted, cap, refused[:3])
        assert all(f"too many connections ({cap})" in a for a in refused), set(refused)
        assert open_fds(agent.proc.pid) < NOFILE - 100, "descriptors ran out"
        # The flood's connections never send: past first_message_within they give way.
        await asyncio.sleep(max(0.0, 3.5 - (time.monotonic() - flood_ended)))
        async with agent.peer(timeout=10.0) as peer:
            assert bytes(await peer.read(rkey, addr, 10)) == b"still here"
