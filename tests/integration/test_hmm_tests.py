"""The kernel's hmm-tests (tools/testing/selftests/mm/hmm-tests.c), against hmmd.

Each test keeps the name and the assertions of its original: ``cpages``,
``faults``, the data, the errno. The dmirror device becomes an agent session on
a real hmmd; ``hmm_dmirror_cmd(fd, HMM_DMIRROR_READ/WRITE/SNAPSHOT, ...)`` becomes
``mirror.read/write/snapshot``; the test process's own memory becomes a puppet,
a real process that mmaps, writes and forks on command. ``hmm2`` (two devices)
is two sessions. Only the cases rated Y or P (docs/ARCHITECTURE.md §A.5) are here;
migration to device memory (rated E) is not.

dmirror's notifier covers the whole address space from ``open()``; a mirror
covers one range, so each test registers its mirror right after the ``mmap``,
before the CPU touches the buffer, which keeps the original's ordering of
device registration before CPU changes.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hmmirror.client import Access, DeviceError, ReadResult
from hmmirror.proto.entries import (
    HMM_DMIRROR_PROT_ERROR,
    HMM_DMIRROR_PROT_NONE,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_PUD,
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_PROT_ZERO,
)
from hmmirror.testing.puppet import Puppet

PAGE_SIZE = 4096
HMM_BUFFER_SIZE = 1024 << 12
NTIMES = 10
TWOMEG = 2 << 20
RW = Access.READ | Access.WRITE

Agent = Callable[..., Any]


def ints(nbytes: int, base: int = 0, sign: int = 1) -> bytes:
    """``ptr[i] = sign * (i + base)`` as native int32, like the C tests fill buffers."""
    values = sign * (np.arange(nbytes // 4, dtype=np.int64) + base)
    return values.astype("<i4").tobytes()


def assert_data(got: bytes, want: bytes, what: str) -> None:
    """Compare buffers as int32 arrays, reporting the first mismatch like ASSERT_EQ would."""
    assert len(got) == len(want), f"{what}: {len(got)} bytes, expected {len(want)}"
    if got == want:
        return
    g = np.frombuffer(got, "<i4")
    w = np.frombuffer(want, "<i4")
    bad = np.flatnonzero(g != w)
    i = int(bad[0])
    pytest.fail(
        f"{what}: {bad.size} ints differ; first ptr[{i}] (page {i * 4 // PAGE_SIZE}) "
        f"= {int(g[i])}, expected {int(w[i])}"
    )


def align_up(x: int, a: int) -> int:
    """hmm-tests' ``ALIGN``."""
    return (x + a - 1) & ~(a - 1)


async def test_open_close(agent: Agent, puppet: Puppet) -> None:
    """open/close of the device: a session and a mirror come and go cleanly."""
    addr = await puppet.mmap(PAGE_SIZE, "rw")
    async with agent() as s:
        mirror = await s.mirror(puppet.pid, addr, PAGE_SIZE, RW)
        status = await s.status()
        assert status["sessions"] == 1
        assert status["mirrors"] == 1
        await mirror.close()
        assert (await s.status())["mirrors"] == 0
    # The closed session must be gone; a new one sees only itself.
    async with agent() as s:
        assert (await s.status())["sessions"] == 1


async def test_anon_read(agent: Agent, puppet: Puppet) -> None:
    """Read private anonymous memory; pages 0-1 are pte_none and the zero page."""
    p = puppet
    npages = HMM_BUFFER_SIZE // PAGE_SIZE
    size = npages * PAGE_SIZE
    async with agent() as s:
        ptr = await p.mmap(size, "rw")
        mirror = await s.mirror(p.pid, ptr, size, RW)

        # Initialize the buffer but leave the first two pages zero (pte_none and pfn_zero).
        want = ints(size)
        await p.write(ptr + 2 * PAGE_SIZE, want[2 * PAGE_SIZE :])
        await p.mprotect(ptr, size, "r")
        # Populate the CPU page table with the special zero page.
        assert await p.read(ptr + PAGE_SIZE, 4) == b"\0" * 4

        r = await mirror.read(ptr, npages)
        assert r.cpages == npages
        assert r.faults == 1
        assert_data(r.data, bytes(2 * PAGE_SIZE) + want[2 * PAGE_SIZE :], "device read")


async def test_anon_read_prot(agent: Agent, puppet: Puppet) -> None:
    """Read private anonymous memory protected with PROT_NONE: -EFAULT."""
    p = puppet
    npages = HMM_BUFFER_SIZE // PAGE_SIZE
    size = npages * PAGE_SIZE
    async with agent() as s:
        ptr = await p.mmap(size, "rw")
        mirror = await s.mirror(p.pid, ptr, size, RW)
        want = ints(size)
        await p.write(ptr, want)
        await p.mprotect(ptr, size, "none")

        with pytest.raises(DeviceError) as info:
            await mirror.read(ptr, npages)
        assert info.value.errno == errno.EFAULT, info.value

        # Allow the CPU to read the buffer so we can check it.
        await p.mprotect(ptr, size, "r")
        assert_data(await p.read(ptr, size), want, "CPU view after the failed read")


async def test_anon_write(agent: Agent, puppet: Puppet) -> None:
    """Write private anonymous memory."""
    p = puppet
    npages = HMM_BUFFER_SIZE // PAGE_SIZE
    size = npages * PAGE_SIZE
    async with agent() as s:
        ptr = await p.mmap(size, "rw")
        mirror = await s.mirror(p.pid, ptr, size, RW)
        want = ints(size)

        r = await mirror.write(ptr, want)
        assert r.cpages == npages
        assert r.faults == 1
        assert_data(await p.read(ptr, size), want, "CPU view of the device write")


async def test_anon_write_prot(agent: Agent, puppet: Puppet) -> None:
    """Write private anonymous memory mapped PROT_READ: -EPERM, then fine after mprotect."""
    p = puppet
    npages = HMM_BUFFER_SIZE // PAGE_SIZE
    size = npages * PAGE_SIZE
    async with agent() as s:
        ptr = await p.mmap(size, "r")
        mirror = await s.mirror(p.pid, ptr, size, RW)

        # A device reading a zero page of memory.
        r = await mirror.read(ptr, 1)
        assert r.cpages == 1
        assert r.faults == 1
        assert r.data == bytes(PAGE_SIZE)

        want = ints(size)
        with pytest.raises(DeviceError) as info:
            await mirror.write(ptr, want)
        assert info.value.errno == errno.EPERM, info.value
        assert_data(await p.read(ptr, size), bytes(size), "CPU view after the refused write")

        # Now allow writing and see that the zero page is replaced.
        await p.mprotect(ptr, size, "rw")
        r = await mirror.write(ptr, want)
        assert r.cpages == npages
        assert r.faults == 1
        assert_data(await p.read(ptr, size), want, "CPU view of the device write")


async def _device_write_in_forked_child(
    agent: Agent, p: Puppet, ptr: int, parent_data: bytes, device_data: bytes
) -> None:
    """Fork; the child, which sees the parent's values, gets its own mirror and device-writes."""
    size = len(device_data)
    child = await p.fork()
    assert_data(await child.read(ptr, size), parent_data, "child's view after fork")
    # The child process needs its own mirror to its own mm.
    async with agent("child") as cs:
        child_mirror = await cs.mirror(child.pid, ptr, size, RW)
        r = await child_mirror.write(ptr, device_data)
        assert r.cpages == size // PAGE_SIZE
        assert r.faults == 1
        assert_data(await child.read(ptr, size), device_data, "child's view of the write")
        await child_mirror.close()
    await child.exit(0)
    assert await child.wait() == 0


@pytest.mark.parametrize("use_thp", [False, True], ids=["4k", "thp"])
async def test_anon_write_child(agent: Agent, puppet: Puppet, use_thp: bool) -> None:
    """A device write in a forked child copies on write; the parent keeps its data.

    Only the non-migrated half of the original's loop (migration is rated E).
    """
    p = puppet
    size = TWOMEG if use_thp else HMM_BUFFER_SIZE
    async with agent("parent") as s:
        old_ptr = await p.mmap(2 * size, "rw")
        ptr = old_ptr
        if use_thp:
            ptr = align_up(old_ptr, size)
            await p.madvise(ptr, size, "hugepage")
        # The original's fixture device is open on the parent's mm during the fork.
        await s.mirror(p.pid, ptr, size, RW)

        parent_data = ints(size)
        device_data = ints(size, sign=-1)
        await p.write(ptr, parent_data)

        await _device_write_in_forked_child(agent, p, ptr, parent_data, device_data)

        # The parent's buffer did not change.
        assert_data(await p.read(ptr, size), parent_data, "parent's view after the child's write")


async def test_anon_write_child_shared(agent: Agent, puppet: Puppet) -> None:
    """A device write in a forked child to MAP_SHARED anon memory is seen by the parent."""
    p = puppet
    npages = HMM_BUFFER_SIZE // PAGE_SIZE
    size = npages * PAGE_SIZE
    async with agent("parent") as s:
        ptr = await p.mmap(size, "rw", shared=True)
        await s.mirror(p.pid, ptr, size, RW)
        parent_data = ints(size)
        device_data = ints(size, sign=-1)
        await p.write(ptr, parent_data)

        await _device_write_in_forked_child(agent, p, ptr, parent_data, device_data)

        # The parent's buffer did change.
        assert_data(await p.read(ptr, size), device_data, "parent's view of the child's write")


async def test_anon_write_huge(agent: Agent, puppet: Puppet) -> None:
    """Write a private anonymous, MADV_HUGEPAGE, PMD-aligned region."""
    p = puppet
    size = TWOMEG
    npages = size // PAGE_SIZE
    async with agent() as s:
        old_ptr = await p.mmap(2 * size, "rw")
        ptr = align_up(old_ptr, size)
        await p.madvise(ptr, size, "hugepage")
        mirror = await s.mirror(p.pid, ptr, size, RW)
        want = ints(size)

        r = await mirror.write(ptr, want)
        assert r.cpages == npages
        assert r.faults == 1
        assert_data(await p.read(ptr, size), want, "CPU view of the device write")


async def test_anon_write_hugetlbfs(
    agent: Agent, puppet: Puppet, hugetlb_pages: Callable[[int], int]
) -> None:
    """Write a MAP_HUGETLB page."""
    p = puppet
    hsize = hugetlb_pages(1)
    size = align_up(TWOMEG, hsize)
    npages = size // PAGE_SIZE
    try:
        ptr = await p.mmap(size, "rw", hugetlb=True)
    except OSError as e:
        pytest.skip(f"Huge page could not be allocated: {e}")
    async with agent() as s:
        mirror = await s.mirror(p.pid, ptr, size, RW)
        want = ints(size)
        r = await mirror.write(ptr, want)
        assert r.cpages == npages
        assert r.faults == 1
        assert_data(await p.read(ptr, size), want, "CPU view of the device write")
        await mirror.close()
    await p.munmap(ptr, size)


async def test_file_read(agent: Agent, puppet: Puppet) -> None:
    """Read a MAP_SHARED, PROT_READ mapping of an O_TMPFILE file."""
    p = puppet
    npages = HMM_BUFFER_SIZE // PAGE_SIZE
    size = npages * PAGE_SIZE
    fd = await p.open_tmpfile(size)
    want = ints(size)
    assert await p.pwrite(fd, want, 0) == size
    async with agent() as s:
        ptr = await p.mmap(size, "r", shared=True, fd=fd)
        mirror = await s.mirror(p.pid, ptr, size, RW)
        r = await mirror.read(ptr, npages)
        assert r.cpages == npages
        assert r.faults == 1
        assert_data(r.data, want, "device read of the file")


async def test_file_write(agent: Agent, puppet: Puppet) -> None:
    """Write a MAP_SHARED, RW file mapping; the data reaches the mapping and the file."""
    p = puppet
    npages = HMM_BUFFER_SIZE // PAGE_SIZE
    size = npages * PAGE_SIZE
    fd = await p.open_tmpfile(size)
    async with agent() as s:
        ptr = await p.mmap(size, "rw", shared=True, fd=fd)
        mirror = await s.mirror(p.pid, ptr, size, RW)
        want = ints(size)
        r = await mirror.write(ptr, want)
        assert r.cpages == npages
        assert r.faults == 1
        assert_data(await p.read(ptr, size), want, "CPU view of the device write")
        assert_data(await p.pread(fd, size, 0), want, "pread of the file")


async def test_anon_read_multiple(agent: Agent, puppet: Puppet) -> None:
    """Read fresh anonymous buffers NTIMES times."""
    p = puppet
    npages = HMM_BUFFER_SIZE // PAGE_SIZE
    size = npages * PAGE_SIZE
    async with agent() as s:
        for c in range(NTIMES):
            ptr = await p.mmap(size, "rw")
            mirror = await s.mirror(p.pid, ptr, size, RW)
            want = ints(size, base=c)
            await p.write(ptr, want)

            r = await mirror.read(ptr, npages)
            assert r.cpages == npages, f"round {c}"
            assert r.faults == 1, f"round {c}"
            assert_data(r.data, want, f"device read, round {c}")

            await mirror.close()
            await p.munmap(ptr, size)


async def test_anon_teardown(agent: Agent, puppet: Puppet) -> None:
    """Read anonymous memory while a puppet thread munmaps its second half.

    As in the original, an error return is allowed; a successful read must be
    complete and correct, and nothing may crash or hang. The puppet's thread
    sleeps ``hmm_random() % 32000`` ns before munmap, like ``unmap_buffer``.

    In the kernel the thread and the ioctl start together and the ioctl takes
    far longer than 32 us, so the munmap lands during the read. Here a device
    read crosses two processes and takes milliseconds while a puppet command
    takes tens of microseconds, so the thread also waits a random offset
    within the duration of an unraced read: otherwise the munmap would always
    land first and the read would never race it. Afterwards the first
    half must still read correctly through the same mirror, the userspace form
    of "the device survived".
    """
    p = puppet
    npages = HMM_BUFFER_SIZE // PAGE_SIZE
    size = npages * PAGE_SIZE
    half = size // 2
    outcomes: list[str] = []
    async with agent() as s:
        # Time one unraced read of a fresh buffer, the window the munmap must hit.
        ptr = await p.mmap(size, "rw")
        mirror = await s.mirror(p.pid, ptr, size, RW)
        await p.write(ptr, ints(size))
        t0 = time.monotonic()
        r = await mirror.read(ptr, npages)
        window = time.monotonic() - t0
        assert r.cpages == npages
        await mirror.close()
        await p.munmap(ptr, size)

        for c in range(NTIMES):
            ptr = await p.mmap(size, "rw")
            mirror = await s.mirror(p.pid, ptr, size, RW)
            want = ints(size, base=c)
            await p.write(ptr, want)

            # The puppet's thread does the waiting: it runs outside this event
            # loop, which is busy with the read itself.
            delay_ns = int(random.uniform(0, window) * 1e9) + random.randrange(32000)
            unmap = await p.munmap_later(ptr + half, half, delay_ns)
            try:
                read: ReadResult | DeviceError = await mirror.read(ptr, npages)
            except DeviceError as e:
                read = e
            joined = await p.join(unmap)
            assert joined["errno"] == 0, f"round {c}: munmap failed: {joined}"

            if isinstance(read, DeviceError):
                outcomes.append(errno.errorcode.get(read.errno or 0, str(read.errno)))
            else:
                outcomes.append("ok")
                assert read.cpages == npages, f"round {c}"
                assert read.faults == 1, f"round {c}"
                assert_data(read.data, want, f"device read, round {c}")

            r = await mirror.read(ptr, half // PAGE_SIZE)
            assert r.cpages == half // PAGE_SIZE, f"round {c}"
            assert_data(r.data, want[:half], f"first half after the unmap, round {c}")
            await mirror.close()
            await p.munmap(ptr, half)
    print(f"anon_teardown: unraced read {window * 1e3:.2f} ms; outcomes {outcomes}")


async def test_double_map(agent: Agent, puppet: Puppet) -> None:
    """Two devices read the same read-only memory (the hmm2 reads; no migration)."""
    p = puppet
    npages = 6
    size = npages * PAGE_SIZE
    async with agent("dev0") as s0, agent("dev1") as s1:
        ptr = await p.mmap(size, "rw")
        m0 = await s0.mirror(p.pid, ptr, size, RW)
        m1 = await s1.mirror(p.pid, ptr, size, RW)
        want = ints(size)
        await p.write(ptr, want)
        await p.mprotect(ptr, size, "r")

        r = await m0.read(ptr, npages)
        assert r.cpages == npages
        assert r.faults == 1
        assert_data(r.data, want, "device 0 read")

        r = await m1.read(ptr, npages)
        assert r.cpages == npages
        assert r.faults == 1
        assert_data(r.data, want, "device 1 read")


async def test_snapshot(agent: Agent, puppet: Puppet) -> None:
    """SNAPSHOT of the 7-page layout; pages 0-4 as the original, 5-6 not migrated.

    Pages 5 and 6 are migrated to device 0 and device 1 in the original (rated
    E); here they stay plain unpopulated RW pages, which snapshot as NONE, the
    value the original also expects for page 6.
    """
    p = puppet
    npages = 7
    size = npages * PAGE_SIZE
    async with agent("dev0") as s0, agent("dev1"):
        ptr = await p.mmap(size, "none")
        mirror = await s0.mirror(p.pid, ptr, size, RW)

        # Punch a hole after the first page address.
        await p.munmap(ptr + PAGE_SIZE, PAGE_SIZE)
        # Page 2 will be a read-only zero page.
        await p.mprotect(ptr + 2 * PAGE_SIZE, PAGE_SIZE, "r")
        val = int(np.frombuffer(await p.read(ptr + 2 * PAGE_SIZE, 4), "<i4")[0]) + 3
        assert val == 3
        # Page 3 will be read-only.
        await p.mprotect(ptr + 3 * PAGE_SIZE, PAGE_SIZE, "rw")
        await p.write(ptr + 3 * PAGE_SIZE, ints(4, base=val))
        await p.mprotect(ptr + 3 * PAGE_SIZE, PAGE_SIZE, "r")
        # Pages 4-6 will be read-write.
        await p.mprotect(ptr + 4 * PAGE_SIZE, 3 * PAGE_SIZE, "rw")
        await p.write(ptr + 4 * PAGE_SIZE, ints(4, base=val))

        m = await mirror.snapshot(ptr, npages)
        assert len(m) == npages
        got = [int(x) for x in m]
        assert got[0] == HMM_DMIRROR_PROT_ERROR, got
        assert got[1] == HMM_DMIRROR_PROT_ERROR, got
        assert got[2] == HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ, got
        assert got[3] == HMM_DMIRROR_PROT_READ, got
        assert got[4] == HMM_DMIRROR_PROT_WRITE, got
        assert got[5] == HMM_DMIRROR_PROT_NONE, got
        assert got[6] == HMM_DMIRROR_PROT_NONE, got


async def test_compound(agent: Agent, puppet: Puppet, hugetlb_pages: Callable[[int], int]) -> None:
    """SNAPSHOT of a written 2 MiB hugetlb page: all WRITE|PMD, then READ|PMD after mprotect."""
    p = puppet
    hsize = hugetlb_pages(1)
    size = align_up(TWOMEG, hsize)
    npages = size // PAGE_SIZE
    try:
        ptr = await p.mmap(size, "rw", hugetlb=True)
    except OSError as e:
        pytest.skip(f"Huge page could not be allocated: {e}")
    async with agent() as s:
        mirror = await s.mirror(p.pid, ptr, size, RW)
        # Initialize the pages the device will snapshot.
        await p.write(ptr, ints(size))

        for cpu_prot, dev_prot in (("rw", HMM_DMIRROR_PROT_WRITE), ("r", HMM_DMIRROR_PROT_READ)):
            if cpu_prot == "r":
                await p.mprotect(ptr, size, "r")
            m = await mirror.snapshot(ptr, npages)
            assert len(m) == npages
            # As the original: the level (PMD or PUD) comes from page 0, and every
            # page must match it exactly.
            pud = int(m[0]) & HMM_DMIRROR_PROT_PUD
            level = HMM_DMIRROR_PROT_PUD if pud else HMM_DMIRROR_PROT_PMD
            want = dev_prot | level
            bad = [(i, int(x)) for i, x in enumerate(m) if int(x) != want]
            assert not bad, (
                f"PROT_{cpu_prot}: {len(bad)} pages differ from {want:#x}; first {bad[:4]}"
            )
        await mirror.close()
    await p.munmap(ptr, size)


async def test_userfaultfd_read(agent: Agent, puppet: Puppet) -> None:
    """Device read of a userfaultfd-MISSING range resolved by a handler thread (T-uffd).

    The puppet registers 4 anonymous pages with a userfaultfd; its handler thread
    answers each fault with UFFDIO_COPY of a page of 0xAB. The device read through
    hmmd blocks on those faults (process_vm_readv does) until the handler runs.
    """
    p = puppet
    npages = 4
    size = npages * PAGE_SIZE
    ptr = await p.mmap(size, "rw")
    handle = await p.uffd_register(ptr, size, fill=0xAB)
    async with agent() as s:
        mirror = await s.mirror(p.pid, ptr, size, RW)
        r = await mirror.read(ptr, npages)
        assert r.cpages == npages
        assert r.data == b"\xab" * size
    stats = await p.uffd_close(handle)
    assert not stats["errors"], stats
    # Only the handler can have produced 0xAB; it must also have seen the faults.
    assert 1 <= stats["copies"] <= npages, stats
