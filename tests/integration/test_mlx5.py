"""The mlx5 ODP model against real targets: faults, invalidation, prefetch, implicit ODP, fences.

A real hmmd, real puppet processes and a ``Nic`` on a real session. What a
test expects is read from the target itself (its own loads, or pagemap), never
from the model under test.
"""

from __future__ import annotations

import asyncio
import errno
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hmmirror.client import DeviceError
from hmmirror.client.mlx5 import (
    ADVISE_FLUSH,
    IMPLICIT_CHILD_SIZE,
    MAX_PREFETCH_LEN,
    WHOLE_ADDRESS_SPACE,
    AccessFlags,
    Advice,
    AtomicOp,
    MemoryRegion,
    Nic,
    RemoteAccessError,
    Sge,
)
from hmmirror.proto.messages import Goodbye, Ok

PAGE = 4096
A = AccessFlags
RW = A.LOCAL_WRITE | A.REMOTE_READ | A.REMOTE_WRITE | A.REMOTE_ATOMIC | A.ON_DEMAND
RO = A.REMOTE_READ | A.ON_DEMAND
#: How long a test waits for an invalidation the proc watcher delivers (it polls).
WATCH_DEADLINE = 5.0


async def until(cond: Callable[[], bool], what: str, deadline: float = WATCH_DEADLINE) -> None:
    """Wait (bounded) until ``cond()`` holds."""
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline} s waiting for {what}")
        await asyncio.sleep(0.01)


def pattern(tag: int, npages: int) -> bytes:
    """Page-distinct data: each page starts with (tag, index)."""
    return b"".join(
        (tag.to_bytes(4, "little") + i.to_bytes(4, "little")) * (PAGE // 8) for i in range(npages)
    )


async def read_all(nic: Nic, mr: MemoryRegion, addr: int, length: int) -> bytes:
    return b"".join(bytes(p) for p in await nic.read(mr.rkey, addr, length))


# --- faults ---------------------------------------------------------------------------------


async def test_first_access_faults_and_a_repeat_does_not(hmmd, puppet, agent):
    addr = await puppet.mmap(8 * PAGE)  # never touched: nothing present at registration
    async with agent() as s:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, addr, 8 * PAGE, RW)
        assert mr.lkey == mr.rkey
        assert mr.mtt.dtype.name == "uint64" and len(mr.mtt) == 8
        assert not any(mr.mapped(addr + i * PAGE) for i in range(8))
        # The target fills the pages after registration: present, but not in the MTT.
        await puppet.write(addr, pattern(1, 8))
        assert not any(mr.mapped(addr + i * PAGE) for i in range(8))
        data = await read_all(nic, mr, addr, 8 * PAGE)
        assert data == pattern(1, 8)
        c = mr.counters
        assert c["page_faults_handled"] == 1
        assert c["page_faults"] == 8
        # A writable MR faults for write: the MTT can take a write without a second fault.
        assert all(mr.writable_at(addr + i * PAGE) for i in range(8))
        await nic.write(mr.rkey, addr + 100, b"xyz")
        assert (await read_all(nic, mr, addr, 8 * PAGE))[100:103] == b"xyz"
        assert await puppet.read(addr + 100, 3) == b"xyz"
        assert mr.counters["page_faults_handled"] == 1, "repeated accesses must not fault"


async def test_registration_maps_present_pages_without_faulting(hmmd, puppet, agent):
    addr = await puppet.mmap(8 * PAGE)
    await puppet.write(addr, pattern(2, 4))  # the first four pages are present
    async with agent() as s:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, addr, 8 * PAGE, RO)
        assert [mr.mapped(addr + i * PAGE) for i in range(8)] == [True] * 4 + [False] * 4
        assert mr.counters["page_faults"] == 0
        assert await read_all(nic, mr, addr, 4 * PAGE) == pattern(2, 4)
        assert mr.counters["page_faults_handled"] == 0


@pytest.mark.parametrize("change", ["munmap", "mprotect", "dontneed"])
async def test_a_change_invalidates_and_the_next_access_faults_and_sees_new_data(
    hmmd, puppet, agent, change
):
    n = 4
    addr = await puppet.mmap(n * PAGE)
    await puppet.write(addr, pattern(1, n))
    async with agent() as s:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, addr, n * PAGE, RW)
        assert await read_all(nic, mr, addr, n * PAGE) == pattern(1, n)
        before = mr.counters
        if change == "munmap":
            await puppet.munmap(addr, n * PAGE)
            await until(lambda: not mr.mapped(addr), "the UNMAP invalidation")
            with pytest.raises(DeviceError) as info:
                await nic.read(mr.rkey, addr, PAGE)
            assert info.value.errno == errno.EFAULT
            await puppet.mmap(n * PAGE, fixed=addr)
        elif change == "mprotect":
            await puppet.mprotect(addr, n * PAGE, "none")
            await until(lambda: not mr.mapped(addr), "the PROTECTION_VMA invalidation")
            with pytest.raises(DeviceError) as info:
                await nic.read(mr.rkey, addr, PAGE)
            assert info.value.errno == errno.EFAULT
            await puppet.mprotect(addr, n * PAGE, "rw")
        else:
            await puppet.madvise(addr, n * PAGE, "dontneed")
            await until(lambda: not mr.mapped(addr), "the CLEAR invalidation")
        after_inval = mr.counters
        assert after_inval["page_invalidations"] >= before["page_invalidations"] + n
        assert after_inval["page_invalidations_handled"] > before["page_invalidations_handled"]
        await puppet.write(addr, pattern(9, n))
        assert await read_all(nic, mr, addr, n * PAGE) == pattern(9, n)
        assert mr.counters["page_faults_handled"] > after_inval["page_faults_handled"]


async def test_read_only_page_of_a_writable_mr_reads_and_refuses_writes(hmmd, puppet, agent):
    addr = await puppet.mmap(2 * PAGE)
    await puppet.write(addr, pattern(3, 2))
    await puppet.mprotect(addr, 2 * PAGE, "r")
    async with agent() as s:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, addr, 2 * PAGE, RW)
        assert await read_all(nic, mr, addr, 2 * PAGE) == pattern(3, 2)
        assert not mr.writable_at(addr)
        with pytest.raises(DeviceError) as info:
            await nic.write(mr.rkey, addr, b"no")
        assert info.value.errno == errno.EPERM
        with pytest.raises(DeviceError) as info:
            await nic.atomic(mr.rkey, addr, AtomicOp.FETCH_ADD, 1)
        assert info.value.errno == errno.EPERM
        assert await puppet.read(addr, 2 * PAGE) == pattern(3, 2)


async def test_fault_of_unknown_length_prefetches_4mib_after_it(hmmd, puppet, agent):
    length = MAX_PREFETCH_LEN + 8 * PAGE
    addr = await puppet.mmap(length)
    async with agent() as s:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, addr, length, RW)
        assert await mr.page_fault(addr) == 1
        after = addr + PAGE
        last = after + MAX_PREFETCH_LEN - PAGE
        await until(lambda: mr.mapped(last), "the prefetch after the fault")
        assert mr.mapped(after)
        assert not mr.mapped(last + PAGE), "the prefetch stops at MAX_PREFETCH_LEN"
        await until(lambda: mr.users == 0, "the prefetch to finish")
        assert mr.counters["page_faults"] == 1 + MAX_PREFETCH_LEN // PAGE
        assert mr.counters["page_prefetch"] == 0
        # A fault of known length maps that much and prefetches nothing.
        mr2 = await nic.reg_mr(puppet.pid, addr + length - 4 * PAGE, 4 * PAGE, RW)
        mapped_before = [mr2.mapped(addr + length - 4 * PAGE + i * PAGE) for i in range(4)]
        assert mapped_before == [False] * 4
        assert await mr2.page_fault(addr + length - 4 * PAGE, 2 * PAGE) == 2
        await asyncio.sleep(0.05)
        assert mr2.users == 0 and not mr2.mapped(addr + length - PAGE)


# --- prefetch -------------------------------------------------------------------------------


async def test_prefetch_modes_set_the_write_bit_and_counters(hmmd, puppet, agent):
    n = 8
    addr = await puppet.mmap(n * PAGE)
    async with agent() as s:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, addr, n * PAGE, RW)
        ro = await nic.reg_mr(puppet.pid, addr, n * PAGE, RO)

        # PREFETCH: faults for read, no WRITE bit even though the MR is writable.
        got = await nic.advise_mr(Advice.PREFETCH, ADVISE_FLUSH, [Sge(addr, 2 * PAGE, mr.lkey)])
        assert got == 2
        assert [mr.mapped(addr + i * PAGE) for i in range(2)] == [True, True]
        assert not mr.writable_at(addr) and not mr.writable_at(addr + PAGE)
        assert mr.counters["page_prefetch"] == 2 and mr.counters["page_faults"] == 0

        # PREFETCH_WRITE: the WRITE bit; EPERM on an MR that is not writable.
        got = await nic.advise_mr(
            Advice.PREFETCH_WRITE, ADVISE_FLUSH, [Sge(addr + 2 * PAGE, 2 * PAGE, mr.lkey)]
        )
        assert got == 2
        assert mr.writable_at(addr + 2 * PAGE) and mr.writable_at(addr + 3 * PAGE)
        assert mr.counters["page_prefetch"] == 4
        with pytest.raises(DeviceError) as info:
            await nic.advise_mr(Advice.PREFETCH_WRITE, ADVISE_FLUSH, [Sge(addr, PAGE, ro.lkey)])
        assert info.value.errno == errno.EPERM

        # PREFETCH_NO_FAULT maps only what is present: the target touches pages 4 and 6.
        await puppet.write(addr + 4 * PAGE, b"p")
        await puppet.write(addr + 6 * PAGE, b"q")
        got = await nic.advise_mr(
            Advice.PREFETCH_NO_FAULT, ADVISE_FLUSH, [Sge(addr + 4 * PAGE, 4 * PAGE, mr.lkey)]
        )
        assert got == 2
        assert [mr.mapped(addr + i * PAGE) for i in range(4, 8)] == [True, False, True, False]
        assert mr.writable_at(addr + 4 * PAGE), "a present, exclusive anonymous page is writable"
        assert mr.counters["page_prefetch"] == 6
        assert mr.counters["page_faults"] == 0

        # Without FLUSH the prefetch is asynchronous: it returns at once and lands later.
        assert await nic.advise_mr(Advice.PREFETCH, 0, [Sge(addr, 3 * PAGE, ro.lkey)]) == 0
        await until(lambda: ro.counters["page_prefetch"] == 3, "the asynchronous prefetch")
        assert all(ro.mapped(addr + i * PAGE) for i in range(3))

        with pytest.raises(DeviceError) as info:
            await nic.advise_mr(Advice.PREFETCH, ADVISE_FLUSH, [Sge(addr, PAGE, 0xDEAD00)])
        assert info.value.errno == errno.EINVAL


# --- implicit ODP ---------------------------------------------------------------------------


async def test_implicit_children_are_created_on_fault_and_dropped_when_empty(hmmd, puppet, agent):
    addr = await puppet.mmap(4 * PAGE)
    await puppet.write(addr, pattern(5, 4))
    async with agent() as s:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, 0, WHOLE_ADDRESS_SPACE, RW)
        assert mr.implicit and mr.children == []
        assert await read_all(nic, mr, addr, 4 * PAGE) == pattern(5, 4)
        child = addr & ~(IMPLICIT_CHILD_SIZE - 1)
        assert mr.children == [child]
        assert mr.children_created == 1
        assert mr.mtt_bytes == IMPLICIT_CHILD_SIZE // PAGE * 8
        # A second access in the same GiB reuses the child.
        await nic.write(mr.rkey, addr + 8, b"12345678")
        assert mr.children == [child] and mr.children_created == 1
        await puppet.munmap(addr, 4 * PAGE)
        await until(lambda: mr.children == [], "the emptied child to be dropped")
        assert mr.children_dropped == 1
        assert mr.counters["page_invalidations"] >= 4, "a dropped child's counts are kept"
        await until(lambda: len(s.mirrors) == 0, "the child's mirror to be unregistered")
        # The next fault creates a fresh child.
        again = await puppet.mmap(PAGE)
        await puppet.write(again, b"z")
        assert (await read_all(nic, mr, again, 1)) == b"z"
        assert mr.children == [again & ~(IMPLICIT_CHILD_SIZE - 1)]
        assert mr.children_created == 2


async def test_implicit_children_that_map_nothing_are_not_kept(hmmd, puppet, agent):
    """Accesses to GiB after GiB where the process maps nothing each made a child (a mirror
    at hmmd) that no invalidation would ever empty: they piled up until the MR was gone, and
    past hmmd's per-peer caps every hm-agent of the uid was refused. Each is dropped once
    its users are done."""
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"k")
    async with agent() as s:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, 0, WHOLE_ADDRESS_SPACE, RW)
        empty = 0x7E0000000000  # far from anything the puppet maps
        for k in range(64):
            with pytest.raises(DeviceError) as info:
                await read_all(nic, mr, empty + k * IMPLICIT_CHILD_SIZE, 1)
            assert info.value.errno == errno.EFAULT, info.value
        await until(lambda: len(s.mirrors) == 0, "the empty children to be unregistered")
        assert mr.children == [] and mr.children_created == 64 == mr.children_dropped
        assert (await s.status())["mirrors"] == 0
        # A child that maps something is kept, and reads on.
        assert await read_all(nic, mr, addr, 1) == b"k"
        assert mr.children == [addr & ~(IMPLICIT_CHILD_SIZE - 1)]


async def test_implicit_access_spanning_two_children(hmmd, puppet, agent):
    # Reserve 2 GiB + 2 pages without memory, then map around a GiB boundary inside it.
    span = 2 * IMPLICIT_CHILD_SIZE + 2 * PAGE
    base = await puppet.mmap(span, "none", noreserve=True)
    boundary = (base + IMPLICIT_CHILD_SIZE) & ~(IMPLICIT_CHILD_SIZE - 1)
    start = boundary - 2 * PAGE
    await puppet.mprotect(start, 4 * PAGE, "rw")
    await puppet.write(start, pattern(6, 4))
    async with agent() as s:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, 0, WHOLE_ADDRESS_SPACE, RW)
        assert await read_all(nic, mr, start, 4 * PAGE) == pattern(6, 4)
        assert mr.children == [boundary - IMPLICIT_CHILD_SIZE, boundary]
        # Without a task (hm-agent's READ of translated pages): inside either child it
        # reads; across the boundary it declines, and the task's path reads it whole.
        for at in (start + 100, boundary + 100):
            got = nic.read_now(mr.rkey, at, 64)
            assert got is not None and bytes(await got) == pattern(6, 4)[at - start :][:64]
        assert nic.read_now(mr.rkey, boundary - 4, 8) is None
        await nic.write(mr.rkey, boundary - 4, b"abcdefgh")
        assert await puppet.read(boundary - 4, 8) == b"abcdefgh"


async def test_a_child_registered_after_hmmd_forgot_the_session_leaves_no_older_child_mapped(
    hmmd, puppet, agent
):
    """A REGISTER refused with NO_SESSION (hmmd ended the session and its EVICTED notice
    never arrived) means every mirror of the session is gone at hmmd: the MR's other
    children must not keep translations no session there tracks (they did: the MR said
    HELLO again and registered the new child only)."""
    span = 2 * IMPLICIT_CHILD_SIZE + 2 * PAGE
    base = await puppet.mmap(span, "none", noreserve=True)
    boundary = (base + IMPLICIT_CHILD_SIZE) & ~(IMPLICIT_CHILD_SIZE - 1)
    first, second = boundary - PAGE, boundary
    await puppet.mprotect(first, 2 * PAGE, "rw")
    await puppet.write(first, pattern(7, 2))
    async with agent() as s:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, 0, WHOLE_ADDRESS_SPACE, RW)
        assert await read_all(nic, mr, first, PAGE) == pattern(7, 2)[:PAGE]
        assert mr.mapped(first)
        # hmmd forgets the session behind the library's back: a GOODBYE on its connection.
        await s.call(Goodbye(), Ok)
        assert await read_all(nic, mr, second, PAGE) == pattern(7, 2)[PAGE:]
        assert not mr.mapped(first), "a child of the forgotten session kept its translation"
        assert await read_all(nic, mr, first, PAGE) == pattern(7, 2)[:PAGE]


async def test_after_an_hmmd_restart_an_mr_registers_again_and_says_so(hmmd, puppet, agent, caplog):
    """The lifecycle line an operator looks for: an MR whose mirror the restart ended
    registers again on its next access, and logs that it did."""
    import logging
    import os
    import signal

    from hmmirror.testing.hmmd import start_hmmd_async

    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"r" * PAGE)
    async with agent() as s:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, addr, PAGE, RW)
        assert await read_all(nic, mr, addr, 8) == b"r" * 8
        epoch = s.epoch
        hmmd.kill(signal.SIGKILL)
        hmmd.proc.wait(10)
        log_path = os.path.join(hmmd.directory, "hmmd-again.stderr")
        again = await start_hmmd_async(
            hmmd.endpoint, ["--ack-deadline", "1s", "--heartbeat", "200ms"], log_path=log_path
        )
        try:
            await until(lambda: s.epoch != epoch and s.lost is None, "the session to reopen")
            with caplog.at_level(logging.INFO, logger="hmmirror.client.mlx5.mr"):
                assert await read_all(nic, mr, addr, 8) == b"r" * 8
            lines = [r.getMessage() for r in caplog.records if "registered again" in r.getMessage()]
            assert len(lines) == 1 and f"pid {puppet.pid}" in lines[0], caplog.text
        finally:
            await again.stop_async()


# --- fences ---------------------------------------------------------------------------------


def held(hold_dma, mr: MemoryRegion) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the next DMA of the MR's one mirror in flight (see the ``hold_dma`` fixture)."""
    (seg,) = mr._segments.values()
    return hold_dma(seg.mirror)


async def test_dereg_mr_waits_for_dma_in_flight(hold_dma, hmmd, puppet, agent):
    addr = await puppet.mmap(2 * PAGE)
    await puppet.write(addr, pattern(7, 2))
    async with agent() as s:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, addr, 2 * PAGE, RW)
        entered, release = held(hold_dma, mr)
        reading = asyncio.ensure_future(read_all(nic, mr, addr, 2 * PAGE))
        await asyncio.wait_for(entered.wait(), 5)
        dereg = asyncio.ensure_future(nic.dereg_mr(mr))
        await asyncio.sleep(0.3)
        assert not dereg.done(), "dereg_mr returned while a DMA was in flight"
        assert mr.users > 0
        with pytest.raises(RemoteAccessError):  # the key is gone at once
            await nic.read(mr.rkey, addr, PAGE)
        release.set()
        assert await asyncio.wait_for(reading, 5) == pattern(7, 2)
        await asyncio.wait_for(dereg, 5)
        assert mr.users == 0
        assert s.mirrors == {}


async def test_invalidation_ack_waits_for_the_dma_in_flight(hold_dma, hmmd, puppet, agent):
    addr = await puppet.mmap(2 * PAGE)
    await puppet.write(addr, pattern(8, 2))
    async with agent() as s, agent() as announcer:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, addr, 2 * PAGE, RW)
        entered, release = held(hold_dma, mr)
        reading = asyncio.ensure_future(read_all(nic, mr, addr, 2 * PAGE))
        await asyncio.wait_for(entered.wait(), 5)
        synced = asyncio.ensure_future(announcer.sync_range(puppet.pid, addr, addr + PAGE))
        await until(lambda: not mr.mapped(addr), "the INVALIDATE to zap the MTT")
        await asyncio.sleep(0.3)
        assert not synced.done(), "the ACK went out while a DMA on the pages was in flight"
        released_at = time.monotonic()
        release.set()
        await asyncio.wait_for(synced, 5)
        assert time.monotonic() >= released_at
        assert await asyncio.wait_for(reading, 5) == pattern(8, 2)


# --- errors ---------------------------------------------------------------------------------


async def test_error_cases(hmmd, puppet, agent):
    addr = await puppet.mmap(4 * PAGE)
    await puppet.write(addr, pattern(4, 4))
    async with agent() as s:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, addr, 4 * PAGE, RW)
        ro = await nic.reg_mr(puppet.pid, addr, 4 * PAGE, RO)

        async def access_error(op: Awaitable[object]) -> None:
            with pytest.raises(RemoteAccessError) as info:
                await op
            assert info.value.errno == errno.EACCES

        await access_error(nic.read(mr.rkey ^ 0x100, addr, PAGE))  # no such key
        await access_error(nic.read(mr.rkey, addr - 1, 2))  # starts before the MR
        await access_error(nic.read(mr.rkey, addr + 4 * PAGE - 1, 2))  # ends after it
        await access_error(nic.write(ro.rkey, addr, b"x"))  # no REMOTE_WRITE
        await access_error(nic.atomic(ro.rkey, addr, AtomicOp.FETCH_ADD, 1))  # no REMOTE_ATOMIC
        no_read = await nic.reg_mr(puppet.pid, addr, PAGE, A.LOCAL_WRITE | A.ON_DEMAND)
        await access_error(nic.read(no_read.rkey, addr, 8))  # no REMOTE_READ
        assert len(await nic.read(no_read.rkey, addr, 8, remote=False)) == 1  # local read is fine
        await access_error(nic.write(ro.lkey, addr, b"x", remote=False))  # no LOCAL_WRITE

        with pytest.raises(DeviceError) as info:
            await nic.atomic(mr.rkey, addr + 4, AtomicOp.FETCH_ADD, 1)
        assert info.value.errno == errno.EINVAL

        await puppet.mprotect(addr + PAGE, PAGE, "r")
        with pytest.raises(DeviceError) as info:
            await nic.write(mr.rkey, addr + PAGE, b"x")
        assert info.value.errno == errno.EPERM

        await puppet.munmap(addr + 2 * PAGE, PAGE)
        for op in (
            nic.read(mr.rkey, addr + 2 * PAGE, 8),
            nic.write(mr.rkey, addr + 2 * PAGE, b"x"),
            nic.atomic(mr.rkey, addr + 2 * PAGE, AtomicOp.CMP_SWAP, 0, 1),
        ):
            with pytest.raises(DeviceError) as info:
                await op
            assert info.value.errno == errno.EFAULT
        assert await puppet.read(addr + PAGE, PAGE) == pattern(4, 4)[PAGE : 2 * PAGE]

        for bad in (
            nic.reg_mr(puppet.pid, addr, PAGE, A.REMOTE_READ),  # not ON_DEMAND
            nic.reg_mr(puppet.pid, addr, PAGE, A.REMOTE_WRITE | A.ON_DEMAND),  # no LOCAL_WRITE
            nic.reg_mr(puppet.pid, addr, 0, RW),
        ):
            with pytest.raises(DeviceError) as info:
                await bad
            assert info.value.errno in (errno.EINVAL, errno.EOPNOTSUPP)


async def test_atomics_and_byte_granular_writes(hmmd, puppet, agent):
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, bytes(PAGE))
    async with agent() as s:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, addr, PAGE, RW)
        assert await nic.atomic(mr.rkey, addr + 8, AtomicOp.FETCH_ADD, 5) == 0
        assert await nic.atomic(mr.rkey, addr + 8, AtomicOp.FETCH_ADD, (1 << 64) - 1) == 5
        assert await nic.atomic(mr.rkey, addr + 8, AtomicOp.CMP_SWAP, 3, 99) == 4  # no swap
        assert await nic.atomic(mr.rkey, addr + 8, AtomicOp.CMP_SWAP, 4, 99) == 4
        assert int.from_bytes(await puppet.read(addr + 8, 8), "little") == 99
        # A 3-byte write leaves its neighbours alone, even ones the CPU wrote meanwhile.
        await puppet.write(addr + 100, b"ABCDE")
        await nic.write(mr.rkey, addr + 101, b"xyz")
        assert await puppet.read(addr + 100, 5) == b"AxyzE"


async def test_a_read_fault_that_races_an_invalidation_discards_its_data(hmmd, puppet, agent):
    """A read's fault brings the data in its own trip; an INVALIDATE that arrives before the
    install voids the data as well as the entries, and the retry reads the new contents."""
    addr = await puppet.mmap(2 * PAGE)
    await puppet.write(addr, pattern(1, 2))
    async with agent() as s, agent() as announcer:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, addr, 2 * PAGE, RW)
        await announcer.sync_range(puppet.pid, addr, addr + 2 * PAGE)  # empty the MTT
        assert not mr.mapped(addr)
        (seg,) = mr._segments.values()
        raced = 0

        async def race() -> None:
            nonlocal raced
            if raced:
                return
            raced += 1
            # The reply (entries + old data) is in; before the install, the CPU side changes.
            await puppet.madvise(addr, 2 * PAGE, "dontneed")
            await puppet.write(addr, pattern(2, 2))
            await announcer.sync_range(puppet.pid, addr, addr + 2 * PAGE)

        seg.mirror.fault_hook = race
        before = await s.status()
        assert await read_all(nic, mr, addr, 2 * PAGE) == pattern(2, 2)
        assert raced == 1 and seg.mirror.retries >= 1
        after = await s.status()
        assert after["dma_reads"] - before["dma_reads"] == 2, "both faults read in their own trip"


async def test_an_evicted_mr_comes_back_on_a_fresh_session_without_old_translations(
    hold_dma, hmmd, puppet, agent
):
    """A DMA held in flight past the ack deadline (1 s here) gets the session evicted; the MR
    then registers a fresh mirror on its own and serves the target's new contents."""
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, pattern(1, 1))
    async with agent() as s, agent() as announcer:
        nic = Nic(s)
        mr = await nic.reg_mr(puppet.pid, addr, PAGE, RW)
        entered, release = held(hold_dma, mr)
        reading = asyncio.ensure_future(read_all(nic, mr, addr, PAGE))
        await asyncio.wait_for(entered.wait(), 5)
        old_mirror = next(iter(mr._segments.values())).mirror
        await puppet.madvise(addr, PAGE, "dontneed")
        await puppet.write(addr, pattern(2, 1))
        # The INVALIDATE waits for the held DMA, misses the deadline, and the session is fenced.
        await asyncio.wait_for(announcer.sync_range(puppet.pid, addr, addr + PAGE), 5)
        await until(lambda: old_mirror.dropped is not None, "the eviction to reach the agent")
        release.set()
        await asyncio.wait_for(reading, 5)  # the held DMA itself had completed before the change
        assert await read_all(nic, mr, addr, PAGE) == pattern(2, 1)
        (fresh,) = mr._segments.values()
        assert fresh.mirror is not old_mirror and fresh.mirror.id != old_mirror.id
        assert (await s.status())["evictions"] >= 1


def _readme_mlx5_example() -> str:
    """The README's mlx5 example, as written there."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    found = [b for b in blocks if "nic = Nic(session)" in b]
    assert len(found) == 1, "README.md no longer has exactly one mlx5 example"
    return found[0]


async def test_the_readme_mlx5_example_runs_as_written(hmmd, puppet, agent):
    """Every line of README's mlx5 example runs against a real target (it once registered
    its MR without REMOTE_ATOMIC, then called nic.atomic)."""
    length = 2 << 20
    addr = await puppet.mmap(length)
    body = "".join(f"    {line}\n" for line in _readme_mlx5_example().splitlines())
    scope: dict[str, object] = {}
    exec(f"async def example(session, pid, addr, length):\n{body}    return mr, old", scope)
    async with agent() as s:
        mr, old = await scope["example"](s, puppet.pid, addr, length)  # type: ignore[operator]
        assert old == 0 and mr.counters["page_prefetch"] >= 1
