"""The target's own sync call: it returns only after every ack, and fails (no hang) on eviction.

Targets are real processes: a separate Python process using the blocking twin
(``BlockingAnnouncer``), and this test process itself using the asyncio form. An
agent session mirrors the target; holding one of its DMAs in flight holds its
ACK, which is how a test makes an ack late or never come.
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import subprocess
import sys
import textwrap
import time

import pytest
from hmmirror.client import Access, Event, SyncIncomplete
from hmmirror.client import target as target_mod

PAGE = 4096

#: The target process: maps a page, announces an UNMAP with the blocking call, then unmaps.
TARGET = textwrap.dedent(
    """
    import ctypes, mmap, sys, time
    from hmmirror.client.target import BlockingAnnouncer
    from hmmirror.client import Event, SyncIncomplete
    m = mmap.mmap(-1, 4096)
    m[:5] = b"hello"
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    print("ready", addr, flush=True)
    sys.stdin.readline()
    me = BlockingAnnouncer(sys.argv[1], timeout=10)
    t0 = time.monotonic()
    try:
        with me.invalidating(addr, addr + 4096, Event.UNMAP):
            print("entered", time.monotonic() - t0, flush=True)
    except SyncIncomplete as exc:
        print("incomplete", time.monotonic() - t0, exc, flush=True)
    me.close()
    """
)


async def start_target(hmmd) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", TARGET, hmmd.endpoint,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 10)
    assert line.startswith(b"ready"), line
    return proc, int(line.split()[1])


async def test_blocking_sync_call_enters_only_after_every_ack(hold_dma, hmmd, agent):
    proc, addr = await start_target(hmmd)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        async with agent() as s:
            mirror = await s.mirror(proc.pid, addr, PAGE, Access.READ)
            entered, release = hold_dma(mirror)
            reading = asyncio.ensure_future(mirror.read(addr, 1))
            await asyncio.wait_for(entered.wait(), 5)
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            await asyncio.sleep(0.4)  # the target is inside its sync call, waiting for our ack
            assert mirror.table[0] == 0, "the INVALIDATE reached the agent"
            released = time.monotonic()
            release.set()
            line = await asyncio.wait_for(proc.stdout.readline(), 10)
            assert line.startswith(b"entered"), line
            waited = float(line.split()[1])
            assert waited >= 0.35, f"entered after {waited:.3f} s, before the held ack"
            assert time.monotonic() >= released
            assert (await reading).data[:5] == b"hello"
            assert [ev for _, _, ev in mirror.events] == [Event.UNMAP]
    finally:
        await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == 0, (await proc.stderr.read()).decode() if proc.stderr else ""


async def test_blocking_sync_call_fails_after_the_deadline_when_an_agent_is_dead(
    hold_dma, hmmd, agent
):
    proc, addr = await start_target(hmmd)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        async with agent(name="stuck-device") as s:
            mirror = await s.mirror(proc.pid, addr, PAGE, Access.READ)
            entered, release = hold_dma(mirror)
            reading = asyncio.ensure_future(mirror.read(addr, 1))
            await asyncio.wait_for(entered.wait(), 5)
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            line = await asyncio.wait_for(proc.stdout.readline(), 10)  # no hang
            release.set()
            await asyncio.gather(reading, return_exceptions=True)
        assert line.startswith(b"incomplete"), line
        waited = float(line.split()[1])
        assert 0.9 <= waited < 5, f"failed after {waited:.3f} s (ack deadline is 1 s)"
        assert b"stuck-device" in line
    finally:
        await asyncio.wait_for(proc.wait(), 10)


async def test_async_sync_call_of_this_process(hold_dma, hmmd, agent):
    region = mmap.mmap(-1, 2 * PAGE)
    region[:4] = b"mine"
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    async with agent() as s, target_mod.connect(hmmd.endpoint) as me:
        mirror = await s.mirror(os.getpid(), addr, 2 * PAGE, Access.READ)
        assert (await mirror.read(addr, 1)).data[:4] == b"mine"
        entered, release = hold_dma(mirror)
        reading = asyncio.ensure_future(mirror.read(addr, 1))
        await asyncio.wait_for(entered.wait(), 5)
        order: list[str] = []

        async def announce() -> None:
            async with me.invalidating(addr, addr + PAGE, Event.CLEAR):
                order.append("entered")

        task = asyncio.ensure_future(announce())
        await asyncio.sleep(0.3)
        assert order == [] and not task.done()
        order.append("released")
        release.set()
        await asyncio.wait_for(task, 5)
        assert order == ["released", "entered"]
        await reading
        # A dead agent: held past the deadline, the call raises instead of hanging.
        entered, _never = hold_dma(mirror)
        stuck = asyncio.ensure_future(mirror.read(addr, 1))
        await asyncio.wait_for(entered.wait(), 5)
        t0 = time.monotonic()
        with pytest.raises(SyncIncomplete):
            async with me.invalidating(addr, addr + PAGE):
                pytest.fail("entered although the agent never acked")
        assert time.monotonic() - t0 < 5
        _never.set()
        await asyncio.gather(stuck, return_exceptions=True)
    del region


#: A target that announces, sits idle until hmmd has closed its silent connection, and
#: announces again.
IDLE_TARGET = textwrap.dedent(
    """
    import mmap, ctypes, sys
    from hmmirror.client.target import BlockingAnnouncer
    m = mmap.mmap(-1, 4096)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    me = BlockingAnnouncer(sys.argv[1], timeout=10)
    me.sync_range(addr, addr + 4096)
    print("first", flush=True)
    sys.stdin.readline()
    me.sync_range(addr, addr + 4096)
    print("second", flush=True)
    me.close()
    """
)


async def test_a_blocking_announcer_whose_connection_hmmd_closed_knocks_again(hmmd):
    """hmmd closes a connection that stays silent without a session (its lease lapsed: a
    blocking announcer sends no heartbeats), 10 s here. The next call used to block in its
    send for good (a DEALER with no peer waits); now the refusal makes it knock again."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", IDLE_TARGET, hmmd.endpoint,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line == b"first\n", line + await proc.stderr.read()
        await asyncio.sleep(12.0)  # past hmmd's drop of silent connections (10 s)
        proc.stdin.write(b"again\n")
        await proc.stdin.drain()
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line == b"second\n", line
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
