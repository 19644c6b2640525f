"""The mirror contract under races: retry on a racing invalidation, eviction, RELEASE, STALE.

Each test drives a real hmmd, real puppet target processes and real agent
sessions; the expected translations are read from /proc/PID/pagemap here,
never through the daemon.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sys
import time
from typing import Any

import numpy as np
import pytest
from hmmirror.client import Access, AgentError, DeviceError, Event, MirrorEvicted, RemoteError
from hmmirror.proto import ErrorCode
from hmmirror.proto.entries import HMM_PFN_PFN_MASK, HMM_PFN_VALID
from hmmirror.proto.messages import (
    Ack,
    Error,
    Evicted,
    Fault,
    Invalidate,
    Ok,
    Register,
    Registered,
    Unregister,
)
from hmmirror.testing.pagemap import pagemap
from hmmirror.testing.rawpeer import RawPeer

PAGE = 4096


def live_pfns(pid: int, addr: int, npages: int) -> np.ndarray:
    """PFNs of the target's pages as pagemap shows them now (0 where absent)."""
    raw = pagemap(pid, addr, npages)
    present = (raw >> np.uint64(63)) != 0
    return np.where(present, raw & np.uint64((1 << 55) - 1), np.uint64(0))


async def test_fault_racing_invalidation_retries_and_never_installs_stale(hmmd, puppet, agent):
    addr = await puppet.mmap(4 * PAGE)
    await puppet.write(addr, b"a" * 4 * PAGE)
    async with agent() as s, agent() as announcer:
        mirror = await s.mirror(puppet.pid, addr, 4 * PAGE, Access.READ)
        old = live_pfns(puppet.pid, addr, 4)
        calls = 0

        async def replace_pages_between_fault_and_install() -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                await puppet.madvise(addr, 4 * PAGE, "dontneed")
                await puppet.write(addr, b"b" * 4 * PAGE)
                await announcer.sync_range(puppet.pid, addr, addr + 4 * PAGE, Event.CLEAR)

        mirror.fault_hook = replace_pages_between_fault_and_install
        installed = await mirror.fault(addr, 4)
        new = live_pfns(puppet.pid, addr, 4)
        assert calls >= 2 and mirror.retries >= 1
        assert installed == 4
        assert not np.array_equal(old, new), "the target's pages were not replaced"
        assert np.array_equal(mirror.table & np.uint64(HMM_PFN_PFN_MASK), new)
        mirror.fault_hook = None
        result = await mirror.read(addr, 4)
        assert result.faults == 0 and result.data == b"b" * 4 * PAGE


async def test_agent_that_never_acks_is_evicted_and_others_complete(hmmd, puppet, agent):
    addr = await puppet.mmap(2 * PAGE)
    await puppet.write(addr, b"x" * 2 * PAGE)
    silent = RawPeer(hmmd.endpoint)  # it heartbeats but never acks: the misbehaving device
    try:
        await silent.hello("silent", heartbeat=True)
        reg = await silent.request(
            Register(pid=puppet.pid, start_time=0, intervals=((addr, addr + 2 * PAGE),), access=1)
        )
        assert isinstance(reg.msg, Registered)
        async with agent() as good:
            mirror = await good.mirror(puppet.pid, addr, 2 * PAGE, Access.READ)
            assert (await mirror.read(addr, 2)).faults == 1
            t0 = time.monotonic()
            await good.sync_range(puppet.pid, addr, addr + 2 * PAGE)
            elapsed = time.monotonic() - t0
            # The ack deadline is 1 s (conftest): the silent agent holds the call that long.
            assert 0.9 <= elapsed < 2.5, elapsed
            assert mirror.counters["page_invalidations_handled"] == 1
            inval = await silent.recv(1.0)
            assert isinstance(inval.msg, Invalidate)
            evicted = await silent.recv(1.0)
            assert isinstance(evicted.msg, Evicted) and reg.msg.mirror in evicted.msg.mirrors
            fenced = await silent.request(
                Fault(mirror=reg.msg.mirror, start=addr, npages=1, write=False, mode=1)
            )
            assert isinstance(fenced.msg, Error) and fenced.msg.code == 106  # FENCED
            stats = await good.status()
            assert stats["evictions"] == 1
            # The good agent is unaffected: a second invalidation completes at once.
            t0 = time.monotonic()
            await good.sync_range(puppet.pid, addr, addr + 2 * PAGE)
            assert time.monotonic() - t0 < 0.5
    finally:
        silent.close()


async def test_target_exit_sends_release_to_every_mirror(hmmd, puppet, agent):
    addr = await puppet.mmap(2 * PAGE)
    await puppet.write(addr, b"r" * 2 * PAGE)
    async with agent() as a, agent() as b:
        ma = await a.mirror(puppet.pid, addr, 2 * PAGE, Access.READ)
        mb = await b.mirror(puppet.pid, addr, 2 * PAGE, Access.READ)
        await ma.read(addr, 2)
        await mb.read(addr, 2)
        await puppet.exit()
        deadline = time.monotonic() + 5
        while not (ma.released and mb.released) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert ma.released and mb.released
        for m in (ma, mb):
            assert not (m.table & np.uint64(HMM_PFN_VALID)).any()
            assert (m.events[-1][2]) == Event.RELEASE
            with pytest.raises(DeviceError) as info:
                await m.read(addr, 1)
            assert info.value.errno == errno.ESRCH
        # hmmd forgets the mm once the RELEASE window closed, a loop turn after the last ACK
        # (which may still be on its way from the other agent), so the status may see it once
        # more: wait for it, within a deadline.
        deadline = time.monotonic() + 5
        stats = await a.status()
        while stats["mms"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            stats = await a.status()
        assert stats["releases"] == 1 and stats["mms"] == 0


async def test_watcher_invalidates_munmap_mprotect_and_dontneed(hmmd, puppet, agent):
    addr = await puppet.mmap(6 * PAGE)
    await puppet.write(addr, b"w" * 6 * PAGE)
    async with agent() as s:
        m = await s.mirror(puppet.pid, addr, 6 * PAGE, Access.READ | Access.WRITE)
        await m.read(addr, 6)
        await puppet.madvise(addr, 2 * PAGE, "dontneed")
        await puppet.mprotect(addr + 2 * PAGE, 2 * PAGE, "r")
        await puppet.munmap(addr + 4 * PAGE, 2 * PAGE)
        deadline = time.monotonic() + 5
        seen: set[Event] = set()
        while (
            time.monotonic() < deadline
            and not {Event.CLEAR, Event.PROTECTION_VMA, Event.UNMAP} <= seen
        ):
            await asyncio.sleep(0.02)
            seen = {e for _, _, e in m.events}
        assert {Event.CLEAR, Event.PROTECTION_VMA, Event.UNMAP} <= seen, m.events
        # The next access faults again and sees the new contents (DONTNEED: zeros).
        result = await m.read(addr, 2)
        assert result.faults == 1 and result.data == bytes(2 * PAGE)
        with pytest.raises(DeviceError) as info:
            await m.write(addr + 2 * PAGE, b"z" * PAGE)
        assert info.value.errno == errno.EPERM
        with pytest.raises(DeviceError) as info:
            await m.read(addr + 4 * PAGE, 1)
        assert info.value.errno == errno.EFAULT


async def test_stale_translation_is_refused(hmmd, puppet, agent):
    """A DMA through entries the target has since replaced never returns the old data."""
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"1" * PAGE)
    async with agent() as s:
        m = await s.mirror(puppet.pid, addr, PAGE, Access.READ)
        assert (await m.read(addr, 1)).faults == 1
        held = int(m.table[0]) & HMM_PFN_PFN_MASK
        # Replace the page and read at once, before the watcher's next poll can invalidate it.
        await puppet.madvise(addr, PAGE, "dontneed")
        await puppet.write(addr, b"2" * PAGE)
        now = int(live_pfns(puppet.pid, addr, 1)[0])
        result = await m.read(addr, 1)
        assert result.data == b"2" * PAGE
        if now != held:
            # The translation went stale: the watcher invalidated it first, or hmmd refused
            # the DMA (STALE). Either way the device re-faulted; it never used the old page.
            assert result.faults == 1
        else:
            # The kernel handed the freed page straight back for the write (same PFN): the
            # held entry still names the page the CPU maps, so no fault is needed.
            assert result.faults in (0, 1)


async def test_coalesced_sync_range_survives_one_cancelled_caller(hmmd, puppet, agent):
    """Concurrent sync_range calls share one message; cancelling one must not cancel the rest."""
    addr = await puppet.mmap(4 * PAGE)
    await puppet.write(addr, b"s" * 4 * PAGE)
    async with agent() as s, agent() as target_side:
        mirror = await s.mirror(puppet.pid, addr, 4 * PAGE, Access.READ)
        await mirror.read(addr, 4)
        calls = [
            asyncio.ensure_future(
                target_side.sync_range(puppet.pid, addr + i * PAGE, addr + (i + 1) * PAGE)
            )
            for i in range(4)
        ]
        await asyncio.sleep(0)  # all four are now in one batch
        calls[0].cancel()
        done = await asyncio.wait_for(asyncio.gather(*calls[1:]), 5)
        assert done == [None, None, None]
        with pytest.raises(asyncio.CancelledError):
            await calls[0]
        # One message carried all four ranges: every page of the mirror was invalidated.
        assert mirror.counters["page_invalidations"] == 4
        stats = await s.status()
        assert stats["invalidations"] == 4


async def test_watcher_reports_fork_write_protect_and_cow_migration(hmmd, puppet, agent):
    """fork write-protects the parent's pages (PROTECTION_PAGE); a write moves one (MIGRATE)."""
    addr = await puppet.mmap(2 * PAGE)
    await puppet.write(addr, b"p" * 2 * PAGE)
    async with agent() as s:
        writer = await s.mirror(puppet.pid, addr, PAGE, Access.READ | Access.WRITE)
        reader = await s.mirror(puppet.pid, addr + PAGE, PAGE, Access.READ)
        await writer.write(addr, b"w" * PAGE)
        await reader.read(addr + PAGE, 1)
        assert writer.table[0] & np.uint64(1 << 62), "a written, exclusive page maps WRITE"
        before = int(live_pfns(puppet.pid, addr + PAGE, 1)[0])
        child = await puppet.fork()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not writer.events:
            await asyncio.sleep(0.02)
        assert [e for _, _, e in writer.events] == [Event.PROTECTION_PAGE]
        assert not reader.events, "a read-only translation survives fork's write-protect"
        await puppet.write(addr + PAGE, b"c" * PAGE)  # COW: the parent gets a new page
        assert int(live_pfns(puppet.pid, addr + PAGE, 1)[0]) != before
        while time.monotonic() < deadline and not reader.events:
            await asyncio.sleep(0.02)
        assert [e for _, _, e in reader.events] == [Event.MIGRATE]
        result = await reader.read(addr + PAGE, 1)
        assert result.faults == 1 and result.data == b"c" * PAGE
        assert await child.read(addr + PAGE, PAGE) == b"p" * PAGE
        await child.exit()


async def test_mm_is_forgotten_when_its_last_mirror_goes_mid_invalidation(hmmd, puppet, agent):
    """An mm whose last mirror goes while an invalidation is open must still be forgotten."""
    addr = await puppet.mmap(PAGE)
    silent = RawPeer(hmmd.endpoint)  # it heartbeats but never acks: the misbehaving device
    try:
        await silent.hello("silent", heartbeat=True)
        reg = await silent.request(
            Register(pid=puppet.pid, start_time=0, intervals=((addr, addr + PAGE),), access=1)
        )
        assert isinstance(reg.msg, Registered)
        async with agent() as announcer:
            assert (await announcer.status())["mms"] == 1
            sync = asyncio.ensure_future(announcer.sync_range(puppet.pid, addr, addr + PAGE))
            assert isinstance((await silent.recv(2.0)).msg, Invalidate)
            # The last mirror goes while its invalidation is still waiting for the ack.
            assert isinstance((await silent.request(Unregister(mirror=reg.msg.mirror))).msg, Ok)
            await asyncio.wait_for(sync, 5)  # the silent session is evicted at the deadline
            deadline = time.monotonic() + 3
            while (await announcer.status())["mms"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            stats = await announcer.status()
            assert stats["mirrors"] == 0
            assert stats["mms"] == 0, "the mm (its pidfd, /proc fds and watcher) leaked"
    finally:
        silent.close()


async def test_an_unreachable_first_agent_does_not_end_the_invalidation_for_the_others(
    hmmd, puppet, agent
):
    """An agent gone without GOODBYE is evicted while the fan-out is still sending.

    That eviction must not close the window: the live agent registered after it still has to
    ack before sync_range answers (here it acks 0.4 s late, on purpose).
    """
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"d" * PAGE)
    dead = RawPeer(hmmd.endpoint)
    await dead.hello("dead")
    assert isinstance(
        (
            await dead.request(
                Register(pid=puppet.pid, start_time=0, intervals=((addr, addr + PAGE),), access=1)
            )
        ).msg,
        Registered,
    )
    dead.close()  # no GOODBYE: its session lives on until the lease runs out
    await asyncio.sleep(0.1)
    slow = RawPeer(hmmd.endpoint)
    try:
        await slow.hello("slow", heartbeat=True)
        reg = await slow.request(
            Register(pid=puppet.pid, start_time=0, intervals=((addr, addr + PAGE),), access=1)
        )
        assert isinstance(reg.msg, Registered)

        async def ack_late() -> None:
            inval = await slow.recv(5.0)
            assert isinstance(inval.msg, Invalidate)
            await asyncio.sleep(0.4)
            slow.send(Ack(n=inval.msg.n))

        acker = asyncio.ensure_future(ack_late())
        async with agent() as announcer:
            t0 = time.monotonic()
            await announcer.sync_range(puppet.pid, addr, addr + PAGE)
            elapsed = time.monotonic() - t0
            await acker
            assert elapsed >= 0.35, (
                f"sync_range returned after {elapsed:.3f} s, before the live ack"
            )
            stats = await announcer.status()
            assert stats["evictions"] == 1  # the dead one, and only it
    finally:
        slow.close()


async def test_an_agent_evicted_for_a_stalled_loop_comes_back_with_a_fresh_session(
    hmmd, puppet, agent
):
    """Past its lease the session is fenced; the agent must drop its mirrors and say HELLO again."""
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"e" * PAGE)
    async with agent() as s:
        old = await s.mirror(puppet.pid, addr, PAGE, Access.READ)
        assert (await old.read(addr, 1)).faults == 1
        time.sleep(1.2)  # the whole loop stalls past the 0.6 s lease (conftest: 200 ms heartbeats)
        deadline = time.monotonic() + 5
        while old.dropped is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with pytest.raises(MirrorEvicted):
            await old.read(addr, 1)
        assert not (old.table & np.uint64(HMM_PFN_VALID)).any()
        fresh = None
        while fresh is None and time.monotonic() < deadline:
            try:
                fresh = await s.mirror(puppet.pid, addr, PAGE, Access.READ)
            except AgentError:
                await asyncio.sleep(0.05)  # the new HELLO may still be on its way
        assert fresh is not None, f"the session never came back: {s.lost}"
        result = await fresh.read(addr, 1)
        assert result.faults == 1 and result.data == b"e" * PAGE


async def test_an_agent_drops_its_entries_a_lease_after_its_last_heartbeat_ack(hmmd, puppet, agent):
    """SPEC §5 step 2: the lease runs from the last heartbeat_ack, on the agent's own clock.
    hmmd is stopped (no eviction notice, no reply comes) and the agent's loop stalls past its
    lease: the first turn of the loop afterwards finds the session lost and no entry left,
    not a lease after the heartbeat it sends on waking (the agent-stop fault scenario hit
    that window once: hmmd's end had dropped the connection, and the notice with it)."""
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"l" * PAGE)
    async with agent() as s:
        mirror = await s.mirror(puppet.pid, addr, PAGE, Access.READ)
        assert (await mirror.read(addr, 1)).faults == 1
        lease = s.welcome.lease_ms / 1000
        os.kill(hmmd.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(lease + 0.3)  # the whole loop stalls past the lease
            await asyncio.sleep(0.01)  # one turn of the loop: the timers then due run
            assert s.lost is not None, "a lease past the last heartbeat_ack, still not lost"
            assert mirror.dropped is not None
            assert not (mirror.table & np.uint64(HMM_PFN_VALID)).any()
        finally:
            os.kill(hmmd.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        fresh = None
        while fresh is None and time.monotonic() < deadline:
            try:
                fresh = await s.mirror(puppet.pid, addr, PAGE, Access.READ)
            except AgentError:
                await asyncio.sleep(0.05)  # the session is still coming back
        assert fresh is not None, f"the session never came back: {s.lost}"
        result = await fresh.read(addr, 1)
        assert result.faults == 1 and result.data == b"l" * PAGE


@pytest.mark.parametrize("event", [Event.RELEASE, Event.EVICT])
async def test_sync_range_may_not_announce_release_or_evict(hmmd, puppet, agent, event):
    """Only hmmd says a process is gone or a mirror evicted; an agent may not say it for others."""
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"r" * PAGE)
    async with agent() as victim, agent() as other:
        mirror = await victim.mirror(puppet.pid, addr, PAGE, Access.READ)
        await mirror.read(addr, 1)
        with pytest.raises(RemoteError) as info:
            await other.sync_range(puppet.pid, addr, addr + PAGE, event)
        assert info.value.code == ErrorCode.EINVAL
        assert not mirror.released and not mirror.events
        assert (await mirror.read(addr, 1)).faults == 0


EXEC_TARGET = """
import mmap, ctypes, os, sys
def page(fill):
    m = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[:] = fill * 4096
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))
m, addr = page(sys.argv[1].encode())
print(addr, flush=True)
if sys.argv[1] == "a":
    sys.stdin.readline()
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[2], "b", sys.argv[2]])
sys.stdin.readline()
"""


async def _exec_and_mirror_the_new_image(proc: Any, s: Any, old: Any) -> None:
    """Make the EXEC_TARGET exec, wait for ``old``'s RELEASE, mirror and read the new image."""
    proc.stdin.write(b"exec\n")
    new_addr = int(await asyncio.wait_for(proc.stdout.readline(), 10))
    deadline = time.monotonic() + 5
    while not old.released and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert old.released, f"no RELEASE for the replaced image: {old.events}"
    new = await s.mirror(proc.pid, new_addr, PAGE, Access.READ)
    result = await new.read(new_addr, 1)
    assert result.faults == 1 and result.data == b"b" * PAGE


async def test_execve_releases_the_old_image_and_the_new_one_can_be_mirrored(hmmd, agent):
    """execve keeps pid and start time but replaces the mm: RELEASE the old, mirror the new."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", EXEC_TARGET, "a", EXEC_TARGET,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        old_addr = int(await asyncio.wait_for(proc.stdout.readline(), 10))
        async with agent() as s:
            old = await s.mirror(proc.pid, old_addr, PAGE, Access.READ)
            assert (await old.read(old_addr, 1)).data == b"a" * PAGE
            await _exec_and_mirror_the_new_image(proc, s, old)
    finally:
        proc.kill()
        await proc.wait()


async def test_the_new_image_can_be_mirrored_while_the_old_ones_release_waits(hmmd, agent):
    """A mirror that never acks keeps the replaced image's RELEASE open (up to the ack
    deadline): registering the new image meanwhile must mirror it, not answer ESRCH
    "process has exited" (which it did while the old Mm held the (pid, start) key)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", EXEC_TARGET, "a", EXEC_TARGET,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    silent = RawPeer(hmmd.endpoint)
    try:
        old_addr = int(await asyncio.wait_for(proc.stdout.readline(), 10))
        await silent.hello("silent", heartbeat=True)
        reg = await silent.request(
            Register(pid=proc.pid, start_time=0, intervals=((old_addr, old_addr + PAGE),), access=1)
        )
        assert isinstance(reg.msg, Registered)
        async with agent() as s:
            old = await s.mirror(proc.pid, old_addr, PAGE, Access.READ)
            await _exec_and_mirror_the_new_image(proc, s, old)
    finally:
        silent.close()
        proc.kill()
        await proc.wait()


async def test_a_sync_range_over_part_of_a_page_invalidates_the_whole_page(hmmd, puppet, agent):
    """A change to part of a page is a change to the page. hmmd and the agent both cut a
    range's ends down to pages, so a target that announced bytes 100..200 of a page (or up
    to one byte into it) left the agent's translation of that page standing."""
    addr = await puppet.mmap(4 * PAGE)
    await puppet.write(addr, b"p" * 4 * PAGE)
    async with agent() as device, agent() as announcer:
        mirror = await device.mirror(puppet.pid, addr, 4 * PAGE, Access.READ)
        await mirror.read(addr, 4)
        assert (mirror.table & np.uint64(HMM_PFN_VALID)).all()
        await announcer.sync_range(puppet.pid, addr + PAGE + 100, addr + PAGE + 200)
        await announcer.sync_range(puppet.pid, addr + 3 * PAGE - 1, addr + 3 * PAGE + 1)
        valid = [bool(e & np.uint64(HMM_PFN_VALID)) for e in mirror.table]
        assert valid == [True, False, False, False], valid
