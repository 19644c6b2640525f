"""A write fault breaks copy-on-write before it hands out WRITE, as ``hmm_range_fault`` does.

Each test drives a real hmmd, a real puppet target (and its fork child) and a
real agent session; what the target maps is read from /proc/PID/pagemap here,
never through the daemon. Every page a write fault gives WRITE must be mapped
exclusively by the target (pagemap bit 56) and be the page the entry names: a
WRITE entry on the zero page or on a page still shared with a fork child would
let a device write memory that is not the target's alone.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hmmirror.client import Access, DeviceError
from hmmirror.daemon.linux.inject import CallFailed, populate_write
from hmmirror.proto.entries import HMM_PFN_PFN_MASK, HMM_PFN_VALID, HMM_PFN_WRITE
from hmmirror.testing.pagemap import PM_EXCLUSIVE, PM_PFN, PM_PRESENT, pagemap

PAGE = 4096
_VALID_WRITE = HMM_PFN_VALID | HMM_PFN_WRITE


def assert_write_entries_exclusive(pid: int, addr: int, table: np.ndarray) -> None:
    """Every entry has VALID and WRITE, on a page the target maps exclusively, by its PFN."""
    live = pagemap(pid, addr, len(table)).tolist()
    for i, (entry, now) in enumerate(zip((int(e) for e in table), live, strict=True)):
        where = f"page {i} at {addr + i * PAGE:#x}: entry {entry:#x}, pagemap {now:#x}"
        assert entry & _VALID_WRITE == _VALID_WRITE, f"a write fault gave no WRITE ({where})"
        assert now & PM_PRESENT and now & PM_EXCLUSIVE, f"WRITE on a page not exclusive ({where})"
        assert entry & HMM_PFN_PFN_MASK == now & PM_PFN, f"the entry names another page ({where})"


async def test_write_fault_over_the_zero_page_hands_out_an_exclusive_page(hmmd, puppet, agent):
    n = 4
    addr = await puppet.mmap(n * PAGE)
    assert await puppet.read(addr, n * PAGE) == bytes(n * PAGE)  # maps the zero page
    zero = pagemap(puppet.pid, addr, n)
    assert (zero & PM_PRESENT).all() and not (zero & PM_EXCLUSIVE).any()
    async with agent() as s:
        m = await s.mirror(puppet.pid, addr, n * PAGE, Access.READ | Access.WRITE)
        await m.fault(addr, n, write=True)
        assert_write_entries_exclusive(puppet.pid, addr, m.table.copy())
        await m.write(addr, b"d" * (n * PAGE))
        assert await puppet.read(addr, n * PAGE) == b"d" * (n * PAGE)


async def test_write_fault_over_pages_shared_with_a_fork_child_breaks_cow(hmmd, puppet, agent):
    n = 4
    addr = await puppet.mmap(n * PAGE)
    await puppet.write(addr, b"p" * (n * PAGE))
    child = await puppet.fork()
    try:
        assert not (pagemap(puppet.pid, addr, n) & PM_EXCLUSIVE).any(), "fork shares them"
        async with agent() as s:
            m = await s.mirror(puppet.pid, addr, n * PAGE, Access.READ | Access.WRITE)
            await m.fault(addr, n, write=True)
            assert_write_entries_exclusive(puppet.pid, addr, m.table.copy())
            await m.write(addr, b"w" * (n * PAGE))
        assert await puppet.read(addr, n * PAGE) == b"w" * (n * PAGE)
        assert await child.read(addr, n * PAGE) == b"p" * (n * PAGE), "the child kept its copy"
    finally:
        await child.exit()


async def test_write_fault_mixes_absent_shared_and_exclusive_pages(hmmd, puppet, agent):
    n = 6
    addr = await puppet.mmap(n * PAGE)
    await puppet.write(addr, b"a" * (2 * PAGE))  # pages 0-1 written before the fork
    child = await puppet.fork()
    try:
        await puppet.write(addr + 2 * PAGE, b"b" * PAGE)  # page 2: the parent's own
        await puppet.read(addr + 3 * PAGE, PAGE)  # page 3: the zero page; 4-5 absent
        async with agent() as s:
            m = await s.mirror(puppet.pid, addr, n * PAGE, Access.READ | Access.WRITE)
            await m.fault(addr, n, write=True)
            assert_write_entries_exclusive(puppet.pid, addr, m.table.copy())
        assert await puppet.read(addr, 3 * PAGE) == b"a" * (2 * PAGE) + b"b" * PAGE
        assert await child.read(addr, 3 * PAGE) == b"a" * (2 * PAGE) + bytes(PAGE)
    finally:
        await child.exit()


#: Another tracer: seizes the pid it is given (PTRACE_SEIZE stops nothing), says so, and holds
#: it until its stdin closes; its exit detaches it. A tracer of its own, not the test process,
#: whose asyncio child watcher would take the puppet's ptrace stops for its exit.
_TRACER = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:
    sys.exit(f"PTRACE_SEIZE: errno {ctypes.get_errno()}")
print("seized", flush=True)
sys.stdin.read()
"""


async def test_write_fault_on_shared_pages_of_a_traced_target_is_refused(hmmd, puppet, agent):
    """Where hmmd cannot make the target break COW (here: another tracer holds it), the
    write fault is refused EFAULT, never answered with WRITE on a shared page; a read
    fault and a write fault over pages already exclusive still work."""
    n = 2
    addr = await puppet.mmap(2 * n * PAGE)
    await puppet.write(addr, b"p" * (2 * n * PAGE))
    child = await puppet.fork()
    await puppet.write(addr + n * PAGE, b"q" * (n * PAGE))  # the second half: the parent's own
    tracer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _TRACER, str(puppet.pid),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert tracer.stdin is not None and tracer.stdout is not None
    try:
        assert await asyncio.wait_for(tracer.stdout.readline(), 10) == b"seized\n"
        async with agent() as s:
            m = await s.mirror(puppet.pid, addr, 2 * n * PAGE, Access.READ | Access.WRITE)
            with pytest.raises(DeviceError) as err:
                await m.fault(addr, n, write=True)
            assert err.value.errno == errno.EFAULT
            assert "copy-on-write" in str(err.value) and "traced" in str(err.value)
            assert not (m.table & np.uint64(HMM_PFN_WRITE)).any()
            await m.fault(addr, n, write=False)
            await m.fault(addr + n * PAGE, n, write=True)
            assert_write_entries_exclusive(puppet.pid, addr + n * PAGE, m.table[n:].copy())
    finally:
        tracer.stdin.close()
        await asyncio.wait_for(tracer.wait(), 10)
        await child.exit()


#: A target that says where its 4 private pages are, then answers each SIGUSR1 with a line,
#: between stretches of sleeping (caught in a system call) and spinning (caught in user code).
_SIGNALLED = """
import mmap, ctypes, os, signal, sys, time
m = mmap.mmap(-1, 4 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
signal.signal(signal.SIGUSR1, lambda *_: os.write(1, b"usr1\\n"))
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
while True:
    time.sleep(0.001)
    end = time.monotonic() + 0.001
    while time.monotonic() < end:
        pass
"""


def _line(fd: int, timeout: float) -> bytes:
    """One line from the pipe ``fd`` (read a byte at a time), or what came before ``timeout``."""
    out = b""
    deadline = time.monotonic() + timeout
    while not out.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        byte = os.read(fd, 1)
        if not byte:
            break
        out += byte
    return out


def test_a_signal_sent_during_a_cow_break_injection_reaches_the_target() -> None:
    """A signal that stops the tracee while hmmd holds it (the checker's SIGUSR1 to its
    target) is delivered once hmmd lets go, never swallowed by the injection's resume.

    The target is started with Popen, which never waits for it in the background: an
    asyncio child watcher would take its ptrace stops for itself."""
    proc = subprocess.Popen([sys.executable, "-c", _SIGNALLED], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    try:
        addr = int(_line(fd, 10))
        rng = random.Random(15)
        failed: list[BaseException] = []

        def inject() -> None:
            try:
                populate_write(proc.pid, [(addr, 4 * PAGE)])
            except BaseException as exc:  # reported below, in the test's thread
                failed.append(exc)

        for i in range(60):
            worker = threading.Thread(target=inject)
            worker.start()
            time.sleep(rng.random() * 0.002)
            os.kill(proc.pid, signal.SIGUSR1)
            worker.join(10)
            assert not failed, failed
            assert _line(fd, 5) == b"usr1\n", f"signal {i} was lost"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_a_cow_break_over_a_range_the_target_unmapped_fails_and_leaves_it_running() -> None:
    """The injected madvise fails as the target's own would (ENOMEM: nothing mapped there),
    raised as CallFailed so the fault walks again; the target's registers are restored."""
    proc = subprocess.Popen([sys.executable, "-c", _SIGNALLED], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    try:
        addr = int(_line(fd, 10))
        with pytest.raises(CallFailed) as err:
            populate_write(proc.pid, [(addr, 4 * PAGE), (PAGE, PAGE)])  # page 1: never mapped
        assert err.value.errno == errno.ENOMEM and "MADV_POPULATE_WRITE" in str(err.value)
        assert (pagemap(proc.pid, addr, 4) & PM_EXCLUSIVE).all(), "the first run ran"
        os.kill(proc.pid, signal.SIGUSR1)
        assert _line(fd, 5) == b"usr1\n", "the target runs on after the failed call"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


#: hmmd's part in a COW break, in a process the test can kill: start the injector, say its
#: pid, then write-fault the run it is given in the target.
_HMMD_STAND_IN = """
import os, sys
from hmmirror.daemon.linux import injector
pid, addr, length = (int(a) for a in sys.argv[1:])
pidfd = os.pidfd_open(pid)
helper, _ = injector.INJECTORS.of(pid, pidfd)
helper.start()
print(helper.pid, flush=True)
injector.populate_write(pid, pidfd, [(addr, length)])
print("done", flush=True)
"""

#: A target with a large untouched private mapping, otherwise as _SIGNALLED.
_LARGE = _SIGNALLED.replace("4 * 4096", str(1 << 29))


def _rss(pid: int) -> int:
    """``pid``'s resident set, bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def _tracer_of(pid: int) -> int:
    """The pid tracing ``pid``, or 0."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("TracerPid:"))


@pytest.mark.parametrize("unit_signal", [None, signal.SIGTERM, signal.SIGABRT])
def test_hmmd_killed_during_a_cow_break_leaves_the_target_running(
    unit_signal: signal.Signals | None,
) -> None:
    """hmmd SIGKILLed while the target runs an injected madvise: the injection is finished
    and undone by the injector process, which then exits; the target never sees it.

    Traced by hmmd itself, the target died of SIGTRAP (the kernel detaches a dead tracer's
    tracees with single-step still set) or ran on with the injected call's registers.
    Under the unit the injector shares hmmd's cgroup, so a stop (SIGTERM) or the watchdog
    (SIGABRT) reaches it too, first: the injector died of SIGABRT, and the target with it."""
    target = subprocess.Popen([sys.executable, "-c", _LARGE], stdout=subprocess.PIPE)
    assert target.stdout is not None
    fd = target.stdout.fileno()
    hmmd = None
    try:
        addr = int(_line(fd, 10))
        base = _rss(target.pid)
        hmmd = subprocess.Popen(
            [sys.executable, "-c", _HMMD_STAND_IN, str(target.pid), str(addr), str(1 << 29)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert hmmd.stdout is not None
        helper = int(hmmd.stdout.readline())
        deadline = time.monotonic() + 20
        while _rss(target.pid) < base + (32 << 20):  # the madvise is under way
            assert time.monotonic() < deadline, "the injected madvise never started"
            time.sleep(0.0005)
        if unit_signal is not None:  # as systemd signals every process of the unit's cgroup
            os.kill(helper, unit_signal)
            os.kill(hmmd.pid, unit_signal)
        hmmd.kill()
        hmmd.wait(10)
        while os.path.exists(f"/proc/{helper}") and _state(helper) != "Z":
            assert time.monotonic() < deadline, "the injector outlived hmmd by 20 s"
            time.sleep(0.01)
        assert target.poll() is None, f"the target died: {target.returncode}"
        assert _tracer_of(target.pid) == 0, "the target is still traced"
        os.kill(target.pid, signal.SIGUSR1)
        answer = _line(fd, 10)
        assert target.poll() is None, f"the target died: {target.returncode}"
        assert answer == b"usr1\n", "the target no longer runs as it did"
    finally:
        for proc in (hmmd, target):
            if proc is not None:
                proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()


def _state(pid: int) -> str:
    """``pid``'s state letter (Z: a zombie, gone but for its exit status)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]
