"""Small RDMA READs of translated pages, served by hm-agent without a task each.

hm-agent answers a small READ whose pages all hold a translation from the mirror's
coalesced ``dma_read`` of that turn of its loop (``Nic.read_now``); a READ that cannot
go that way, or whose run hmmd refuses, takes the task's path, which faults and
retries. Whatever the path, a requester gets exactly the bytes the target holds now.

A real hmmd (ipc), a real puppet target, a real ``hm-agent`` process on tcp loopback
(CURVE) and an ``RdmaPeer``; hmmd's ``status`` counts its ``dma_reads`` and ``stale``
refusals.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
import zmq
from hmmirror.client.mlx5.service import MAX_IN_FLIGHT
from hmmirror.client.session import status
from hmmirror.proto import decode, encode
from hmmirror.proto import messages as M
from hmmirror.testing.pagemap import PM_PFN, pagemap
from hmmirror.testing.rdma import hm_agent
from hmmirror.transport import dial

PAGE = 4096


async def counts(hmmd: Any) -> dict[str, int]:
    """hmmd's DMA read and stale refusal counts."""
    got = await status(hmmd.endpoint)
    return {k: int(got[k]) for k in ("dma_reads", "stale")}


async def test_concurrent_small_reads_at_any_offset_get_their_own_bytes(hmmd, puppet):
    npages = 16
    addr = await puppet.mmap(npages * PAGE)
    data = os.urandom(npages * PAGE)
    await puppet.write(addr, data)
    # Within a page, across page boundaries, at the MR's first and last bytes, a whole page.
    asks = [(0, 1), (5, 300), (PAGE - 7, 20), (3 * PAGE + 1000, 4096), (npages * PAGE - 1, 1)]
    asks += [(i * PAGE, PAGE) for i in range(6, 14)]
    async with (
        hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{npages * PAGE}:rw") as agent,
        agent.peer() as peer,
    ):
        (rkey,) = agent.rkeys
        before = await counts(hmmd)
        for _ in range(3):
            got = await asyncio.gather(*(peer.read(rkey, addr + off, n) for off, n in asks))
            for (off, n), piece in zip(asks, got, strict=True):
                assert bytes(piece) == data[off : off + n], f"READ of {n} bytes at +{off}"
        after = await counts(hmmd)
    reads = 3 * len(asks)
    assert 1 <= after["dma_reads"] - before["dma_reads"] <= reads
    assert after["stale"] == before["stale"]


# hmmd sees the target's change only at the DMA's own check: no userfaultfd, a slow poll.
@pytest.mark.hmmd_args("--uffd", "off", "--poll-interval", "30s", "--poll-max", "30s")
async def test_small_reads_after_the_target_rewrote_a_page_unseen_get_the_new_bytes(hmmd, puppet):
    """hmmd does not see the target's change before the READs: the agent still holds page
    3's old frame, hmmd refuses the run STALE at the DMA's own check, and every READ, page
    3's through a fresh fault, gets the bytes the target holds now. The page is shared
    copy-on-write with a child when the target writes it, so its new frame is never the old
    one (a freed frame is often handed out again at once)."""
    npages = 8
    addr = await puppet.mmap(npages * PAGE)
    data = bytearray(os.urandom(npages * PAGE))
    await puppet.write(addr, bytes(data))
    async with (
        hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{npages * PAGE}:rw") as agent,
        agent.peer() as peer,
    ):
        (rkey,) = agent.rkeys
        assert bytes(await peer.read(rkey, addr + 3 * PAGE, 8)) == data[3 * PAGE : 3 * PAGE + 8]
        frame = int(pagemap(puppet.pid, addr + 3 * PAGE, 1)[0]) & PM_PFN
        child = await puppet.fork()
        data[3 * PAGE : 4 * PAGE] = os.urandom(PAGE)
        await puppet.write(addr + 3 * PAGE, bytes(data[3 * PAGE : 4 * PAGE]))
        assert int(pagemap(puppet.pid, addr + 3 * PAGE, 1)[0]) & PM_PFN != frame
        before = await counts(hmmd)
        asks = [(i * PAGE + 100, 200) for i in range(npages)]
        got = await asyncio.gather(*(peer.read(rkey, addr + off, n) for off, n in asks))
        for (off, n), piece in zip(asks, got, strict=True):
            assert bytes(piece) == data[off : off + n], f"READ at +{off}"
        after = await counts(hmmd)
        await child.exit()
    assert after["stale"] > before["stale"], "hmmd refused the old frame"


def _flood(
    endpoint: str, rkey: int, addr: int, npages: int, count: int, hmmd_pid: int
) -> list[str]:
    """``count`` 4-byte READs over the pages at once from a raw DEALER while hmmd is stopped;
    the error texts of the answers that came within 2 s. Then hmmd is continued, and every
    other READ must be answered (with data or an error) within 30 s."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = dial(ctx, endpoint, None, timeout=5.0)
    try:
        os.kill(hmmd_pid, signal.SIGSTOP)
        try:
            for i in range(1, count + 1):
                read = M.RdmaRead(rkey=rkey, addr=addr + i % npages * PAGE, length=4)
                sock.send_multipart(encode(read, i))
            early = []
            while sock.poll(2000):
                msg = decode(sock.recv_multipart()).msg
                early.append(msg.message if isinstance(msg, M.Error) else "")
        finally:
            os.kill(hmmd_pid, signal.SIGCONT)
        answered = len(early)
        deadline = time.monotonic() + 30
        while answered < count and sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            sock.recv_multipart()
            answered += 1
        assert answered == count, f"{count - answered} READs were never answered"
        return early
    finally:
        sock.close(linger=0)
        ctx.term()


async def test_reads_without_a_task_count_against_the_requests_in_flight(hmmd, puppet):
    """hmmd stopped (SIGSTOP): READs of translated pages wait in their runs without a
    task. They still hold places of ``MAX_IN_FLIGHT``, so of ``MAX_IN_FLIGHT + 40`` READs
    sent at once exactly 40 are refused EBUSY at once, and the agent's memory stays
    bounded whatever a requester sends. Continued, hmmd lets every other READ be answered."""
    npages = 64
    addr = await puppet.mmap(npages * PAGE)
    await puppet.write(addr, os.urandom(npages * PAGE))
    spec = f"{puppet.pid}:{addr:#x}:{npages * PAGE}:rw"
    async with hm_agent(hmmd, spec, insecure=True) as agent, agent.peer() as peer:
        (rkey,) = agent.rkeys
        await peer.read(rkey, addr, npages * PAGE)  # the agent holds every translation
        flood = MAX_IN_FLIGHT + 40
        early = await asyncio.to_thread(
            _flood, agent.endpoint, rkey, addr, npages, flood, hmmd.proc.pid
        )
        busy = [a for a in early if "requests already in progress" in a]
        assert len(early) == len(busy) == 40, early[:3]
        assert len(await peer.read(rkey, addr, 8)) == 8, "the agent serves READs again"
