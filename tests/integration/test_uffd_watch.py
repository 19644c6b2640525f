"""The uffd watcher against real targets: events arrive as the change happens, not a poll later.

hmmd runs with a proc-watcher poll of 4 s here, so an invalidation seen within
a second can only have come from the target's userfaultfd (and hmmd's
``uffd_events`` counter says so too). Each case runs for
the three ways hmmd gets the fd: the target's ``expose()`` (SCM_RIGHTS), an
unconfigured uffd the target left open for pidfd_getfd, and ptrace injection
into a target that does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from hmmirror.client import Access, Event

PAGE = 4096
#: Far slower than any assertion below: only the uffd path can be this fast.
SLOW_POLL = ("--poll-interval", "4s", "--poll-max", "4s")
EVENT_DEADLINE = 1.0

#: hmmd also injects a uffd into targets that offer none (the "inject" way below).
pytestmark = pytest.mark.hmmd_args(*SLOW_POLL, "--uffd", "inject")


async def events_within(mirror, n: int, deadline: float = EVENT_DEADLINE) -> list[Event]:
    """The mirror's first ``n`` invalidation events, waiting at most ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while len(mirror.events) < n:
        if time.monotonic() > end:
            raise AssertionError(f"only {mirror.events} within {deadline} s")
        await asyncio.sleep(0.005)
    return [ev for _, _, ev in mirror.events]


@pytest.fixture(params=["expose", "getfd", "inject"])
async def watched(request, hmmd, puppet):
    """The puppet, offering hmmd its userfaultfd the parametrised way (or not at all)."""
    if request.param == "expose":
        await puppet.expose(hmmd.endpoint)
    elif request.param == "getfd":
        await puppet.uffd_leave()
    return puppet


async def mirrored(agent_session, puppet, npages: int, access=Access.READ):
    addr = await puppet.mmap(npages * PAGE)
    await puppet.write(addr, b"x" * npages * PAGE)
    mirror = await agent_session.mirror(puppet.pid, addr, npages * PAGE, access)
    await mirror.fault(addr, npages)
    return addr, mirror


async def test_hmmd_watches_through_the_target_uffd(hmmd, watched, agent):
    async with agent() as s:
        await mirrored(s, watched, 1)
        st = await s.status()
        assert st["uffd_watched"] == 1


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("munmap", Event.UNMAP),
        ("dontneed", Event.CLEAR),
        ("free", Event.CLEAR),
        ("mremap", Event.UNMAP),
        ("fixed", Event.UNMAP),
    ],
)
async def test_the_right_event_arrives_at_once(hmmd, watched, agent, change, expected):
    puppet = watched
    async with agent() as s:
        addr, mirror = await mirrored(s, puppet, 4)
        t0 = time.monotonic()
        if change == "munmap":
            await puppet.munmap(addr + PAGE, 2 * PAGE)
            lo, hi = addr + PAGE, addr + 3 * PAGE
        elif change == "dontneed":
            await puppet.madvise(addr, 4 * PAGE, "dontneed")
            lo, hi = addr, addr + 4 * PAGE
        elif change == "free":
            await puppet.madvise(addr, 4 * PAGE, "free")
            lo, hi = addr, addr + 4 * PAGE
        elif change == "mremap":
            await puppet.mremap(addr, 4 * PAGE, 8 * PAGE, maymove=True)
            lo, hi = addr, addr + 4 * PAGE
        else:
            await puppet.mmap(2 * PAGE, fixed=addr)
            lo, hi = addr, addr + 2 * PAGE
        events = await events_within(mirror, 1)
        assert time.monotonic() - t0 < EVENT_DEADLINE
        assert events[0] == expected
        assert (await s.status())["uffd_events"] >= 1
        start, end, _ = mirror.events[0]
        assert start <= lo and hi <= end + 0, (hex(start), hex(end), hex(lo), hex(hi))
        page = (lo - addr) // PAGE
        assert mirror.table[page] == 0, "the agent zapped the page"


async def test_fork_downgrades_write_entries_at_once(hmmd, watched, agent):
    puppet = watched
    async with agent() as s:
        addr, mirror = await mirrored(s, puppet, 2, Access.READ | Access.WRITE)
        await mirror.fault(addr, 2, write=True)
        child = await puppet.fork()
        try:
            events = await events_within(mirror, 1)
            assert Event.PROTECTION_PAGE in events
        finally:
            await child.exit()


async def test_a_write_fault_breaks_cow_under_the_watch(hmmd, watched, agent):
    """A write fault over the zero page of a watched target: COW broken, WRITE handed out.

    With "getfd" the target still holds the userfaultfd hmmd watches through; the injector
    must not take it for one the target serves itself (and refuse the write fault)."""
    puppet = watched
    async with agent() as s:
        addr = await puppet.mmap(4 * PAGE)
        assert await puppet.read(addr, 4 * PAGE) == bytes(4 * PAGE)  # the zero page
        mirror = await s.mirror(puppet.pid, addr, 4 * PAGE, Access.READ | Access.WRITE)
        assert await mirror.fault(addr, 4, write=True) == 4
        assert (await s.status())["uffd_watched"] == 1
        await mirror.write(addr, b"w" * PAGE)
        assert await puppet.read(addr, PAGE) == b"w" * PAGE


async def test_mprotect_and_new_vmas_are_still_caught(hmmd, watched, agent):
    """mprotect raises no uffd event: the proc watcher (4 s here, so wait for it) covers it;
    and a VMA mapped later under a mirror gets registered, so its munmap is an event."""
    puppet = watched
    async with agent() as s:
        hole = await puppet.mmap(4 * PAGE)
        await puppet.munmap(hole + 2 * PAGE, 2 * PAGE)  # a mirror over a half-mapped range
        mirror = await s.mirror(puppet.pid, hole, 4 * PAGE, Access.READ)
        await puppet.write(hole, b"y" * 2 * PAGE)
        await mirror.fault(hole, 2)
        later = await puppet.mmap(2 * PAGE, fixed=hole + 2 * PAGE)
        assert later == hole + 2 * PAGE
        await puppet.write(later, b"z" * 2 * PAGE)
        await mirror.fault(later, 2)  # faulting it makes hmmd register the new VMA, too
        await puppet.munmap(later, 2 * PAGE)
        events = await events_within(mirror, 1)
        assert events[0] == Event.UNMAP
        await puppet.mprotect(hole, 2 * PAGE, "none")
        events = await events_within(mirror, 2, deadline=10.0)
        assert events[1] == Event.PROTECTION_VMA


async def test_a_range_mapped_again_at_once_is_watched_at_once(hmmd, watched, agent):
    """MAP_FIXED over mirrored pages (an UNMAP) leaves a new VMA there that no uffd covers:
    hmmd looks for it right after the UNMAP, so a DONTNEED of it is an event at once, not
    after the next proc-watcher poll (4 s here). Before, nothing came within the second."""
    puppet = watched
    async with agent() as s:
        addr, mirror = await mirrored(s, puppet, 4)
        again = await puppet.mmap(2 * PAGE, fixed=addr + PAGE)
        assert again == addr + PAGE
        assert (await events_within(mirror, 1))[0] == Event.UNMAP
        await asyncio.sleep(0.1)  # hmmd's first look is 1 ms after the UNMAP, its last 85 ms
        await puppet.write(again, b"w" * 2 * PAGE)
        await puppet.madvise(again, 2 * PAGE, "dontneed")
        events = await events_within(mirror, 2)
        assert events[1] == Event.CLEAR
        start, end, _ = mirror.events[1]
        assert start <= again and again + 2 * PAGE <= end


async def test_a_range_mapped_again_under_two_mirrors_is_watched_for_both(hmmd, watched, agent):
    """Two agents mirror overlapping ranges, pages [0, 4) and [2, 6). MAP_FIXED over pages
    3 and 4, under both, leaves a new VMA that hmmd registers in one walk of the union of
    the two mirrors' spans: a DONTNEED of it is an event at once for each mirror."""
    puppet = watched
    async with agent() as s1, agent() as s2:
        addr = await puppet.mmap(6 * PAGE)
        await puppet.write(addr, b"x" * 6 * PAGE)
        first = await s1.mirror(puppet.pid, addr, 4 * PAGE, Access.READ)
        second = await s2.mirror(puppet.pid, addr + 2 * PAGE, 4 * PAGE, Access.READ)
        await first.fault(addr, 4)
        await second.fault(addr + 2 * PAGE, 4)
        again = await puppet.mmap(2 * PAGE, fixed=addr + 3 * PAGE)
        assert again == addr + 3 * PAGE
        assert (await events_within(first, 1))[0] == Event.UNMAP
        assert (await events_within(second, 1))[0] == Event.UNMAP
        await asyncio.sleep(0.1)  # hmmd's first look is 1 ms after the UNMAP, its last 85 ms
        await puppet.write(again, b"w" * 2 * PAGE)
        await puppet.madvise(again, 2 * PAGE, "dontneed")
        assert (await events_within(first, 2))[1] == Event.CLEAR
        assert (await events_within(second, 2))[1] == Event.CLEAR
        assert first.events[1][:2] == (again, addr + 4 * PAGE)  # clipped to its bounds
        start, end, _ = second.events[1]
        assert start <= again and again + 2 * PAGE <= end


async def test_a_target_with_a_uffd_exits(hmmd, watched, agent):
    puppet = watched
    async with agent() as s:
        _, mirror = await mirrored(s, puppet, 1)
        await puppet.exit()
        await events_within(mirror, 1)
        assert mirror.released
        # hmmd forgets the mm (and closes its uffd) once the RELEASE is acked, a loop turn
        # after our ACK: a status sent right behind that ACK may be answered in between.
        deadline = time.monotonic() + 5.0
        while (await s.status())["uffd_watched"] != 0:
            assert time.monotonic() < deadline, "hmmd still watches the exited target's uffd"
            await asyncio.sleep(0.01)


TARGET = textwrap.dedent(
    """
    import ctypes, mmap, sys, time
    from hmmirror.client.target import expose
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    addr = libc.mmap(None, 8192, 3, 0x22, -1, 0)
    ctypes.memset(addr, 7, 8192)
    expose(sys.argv[1])
    print("ready", addr, flush=True)
    sys.stdin.readline()
    t0 = time.monotonic()
    libc.munmap(ctypes.c_void_p(addr), 4096)
    print("munmap returned", time.monotonic() - t0, flush=True)
    """
)


async def test_the_target_carries_on_when_hmmd_dies_while_it_is_blocked(hmmd, agent):
    """hmmd is stopped (so it cannot read the event) while the target munmaps, then killed:
    the target, blocked in munmap meanwhile, goes on as soon as hmmd's fd closes."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", TARGET, hmmd.endpoint,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert line.startswith(b"ready"), line + (await proc.stderr.read() if proc.stderr else b"")
        addr = int(line.split()[1])
        async with agent() as s:
            mirror = await s.mirror(proc.pid, addr, 2 * PAGE, Access.READ)
            await mirror.fault(addr, 2)
            assert (await s.status())["uffd_watched"] == 1
            hmmd.kill(signal.SIGSTOP)
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            await asyncio.sleep(0.5)
            assert proc.returncode is None
            blocked = not proc.stdout.at_eof() and not proc.stdout._buffer  # type: ignore[attr-defined]
            assert blocked, "munmap returned although hmmd never read the event"
            hmmd.kill(signal.SIGKILL)
            line = await asyncio.wait_for(proc.stdout.readline(), 5)
            assert line.startswith(b"munmap returned"), line
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def pages_of(events, addr: int, kind: Event) -> set[int]:
    """The page indexes (from ``addr``) that ``kind`` events covered."""
    out: set[int] = set()
    for start, end, ev in events:
        if ev == kind:
            out.update(range((start - addr) // PAGE, (end - addr) // PAGE))
    return out


async def test_written_tracking_reports_exactly_the_pages_written(hmmd, watched, agent):
    puppet = watched
    async with agent() as s, agent() as plain:
        addr = await puppet.mmap(16 * PAGE)
        await puppet.write(addr, b"a" * 16 * PAGE)
        mirror = await s.mirror(puppet.pid, addr, 16 * PAGE, Access.READ, watch_writes=True)
        other = await plain.mirror(puppet.pid, addr, 16 * PAGE, Access.READ)
        await mirror.fault(addr, 16)
        await other.fault(addr, 16)
        await puppet.read(addr + 3 * PAGE, 64)  # reads are never reported
        written = {1, 5, 6, 11}
        for page in sorted(written):
            await puppet.write(addr + page * PAGE + 100, b"w")
        end = time.monotonic() + EVENT_DEADLINE
        while pages_of(mirror.events, addr, Event.WRITTEN) != written:
            assert pages_of(mirror.events, addr, Event.WRITTEN) <= written, mirror.events
            assert time.monotonic() < end, f"WRITTEN events so far: {mirror.events}"
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)  # nothing more comes: exactly the pages written
        assert pages_of(mirror.events, addr, Event.WRITTEN) == written
        assert all(ev == Event.WRITTEN for _, _, ev in mirror.events)
        assert [mirror.table[p] == 0 for p in range(16)] == [p in written for p in range(16)]
        assert other.events == [], "a mirror that did not subscribe gets no WRITTEN"
        # Writing again after the zap is reported again.
        await puppet.write(addr + 2 * PAGE, b"again")
        await events_within(mirror, len(mirror.events) + 1)
        assert 2 in pages_of(mirror.events, addr, Event.WRITTEN)


@pytest.mark.hmmd_args(*SLOW_POLL)
async def test_watching_writes_needs_the_target_uffd(hmmd, puppet, agent):
    from hmmirror.client import RemoteError

    addr = await puppet.mmap(PAGE)
    async with agent() as s:
        with pytest.raises(RemoteError) as info:
            await s.mirror(puppet.pid, addr, PAGE, Access.READ, watch_writes=True)
        assert "userfaultfd" in str(info.value)
        await s.mirror(puppet.pid, addr, PAGE, Access.READ)  # without the subscription: fine


def fd_table(pid: int) -> dict[str, str]:
    return {name: os.readlink(f"/proc/{pid}/fd/{name}") for name in os.listdir(f"/proc/{pid}/fd")}


@pytest.mark.hmmd_args(*SLOW_POLL, "--uffd", "inject")
async def test_injected_uffd_watches_an_unmodified_target(hmmd, puppet, agent):
    before = fd_table(puppet.pid)
    async with agent() as s:
        addr, mirror = await mirrored(s, puppet, 2)
        st = await s.status()
        assert st["uffd_watched"] == 1, st["uffd_last_refusal"]
        assert fd_table(puppet.pid) == before, "the target's fd table is as it was"
        assert (await puppet.ping())["pid"] == puppet.pid, "the target carries on"
        await puppet.munmap(addr, PAGE)
        assert (await events_within(mirror, 1))[0] == Event.UNMAP


@pytest.mark.hmmd_args(*SLOW_POLL, "--uffd", "inject")
async def test_injection_into_a_traced_process_is_refused_clearly(hmmd, puppet, agent):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    assert libc.ptrace(0x4206, puppet.pid, None, None) == 0  # PTRACE_SEIZE: we trace it now
    try:
        async with agent() as s:
            _, mirror = await mirrored(s, puppet, 1)  # the mirror still works, by proc watcher
            st = await s.status()
            assert st["uffd_watched"] == 0
            assert st["uffd_refusals"] == 1
            assert f"already traced by pid {os.getpid()}" in st["uffd_last_refusal"]
            assert "already traced" in hmmd.stderr()
            assert (await mirror.read(mirror.start, 1)).cpages == 1
    finally:
        libc.ptrace(17, puppet.pid, None, None)  # PTRACE_DETACH


@pytest.mark.hmmd_args(*SLOW_POLL, "--uffd-fork", "adopt")
async def test_fork_policy_adopt_watches_the_child_through_its_uffd(hmmd, puppet, agent):
    await puppet.expose(hmmd.endpoint)
    async with agent() as s:
        addr, mirror = await mirrored(s, puppet, 2, Access.READ | Access.WRITE)
        child = await puppet.fork()
        try:
            await events_within(mirror, 1)  # the parent's COW downgrade, at once
            child_mirror = await s.mirror(child.pid, addr, 2 * PAGE, Access.READ)
            await child_mirror.fault(addr, 2)
            end = time.monotonic() + EVENT_DEADLINE  # the adoption settles just after fork
            while (await s.status())["uffd_watched"] < 2:
                assert time.monotonic() < end, "the child is not watched by its uffd"
                await asyncio.sleep(0.01)
            await child.munmap(addr, PAGE)
            assert (await events_within(child_mirror, 1))[0] == Event.UNMAP
        finally:
            await child.exit()


@pytest.mark.hmmd_args(*SLOW_POLL)
async def test_fork_policy_close_leaves_the_child_to_the_proc_watcher(hmmd, puppet, agent):
    await puppet.expose(hmmd.endpoint)
    async with agent() as s:
        addr, _ = await mirrored(s, puppet, 1)
        child = await puppet.fork()
        try:
            child_mirror = await s.mirror(child.pid, addr, PAGE, Access.READ)
            await child_mirror.fault(addr, 1)
            assert (await s.status())["uffd_watched"] == 1, "only the parent"
        finally:
            await child.exit()


@pytest.mark.hmmd_args(*SLOW_POLL, "--uffd", "inject")
async def test_injection_into_a_target_spinning_in_user_code_is_refused_clearly(hmmd, agent):
    import subprocess
    import sys

    # Only once it says so is it spinning: while Python starts up it makes system calls.
    spinner = subprocess.Popen(
        [sys.executable, "-c", "print('spinning', flush=True)\nwhile True: pass"],
        stdout=subprocess.PIPE,
    )
    assert spinner.stdout is not None and spinner.stdout.readline() == b"spinning\n"
    try:
        async with agent() as s:
            await s.mirror(spinner.pid, 0x10000, PAGE, Access.READ)  # still mirrored, by proc
            st = await s.status()
            assert st["uffd_watched"] == 0
            assert "never caught in a system call" in st["uffd_last_refusal"]
        assert spinner.poll() is None, "the target runs on, untouched"
    finally:
        spinner.kill()
        spinner.wait()
        spinner.stdout.close()


#: A target whose main thread waits in vfork() (a clone with CLONE_VFORK and its own
#: memory) for 30 s: it never stops for ptrace meanwhile. Prints its pid and a page's address.
NEVER_STOPS = """
import ctypes, mmap, os, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
m = mmap.mmap(-1, 4096)
print(os.getpid(), ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
if libc.syscall(56, 0x4000 | 17, 0, 0, 0, 0) == 0:  # clone(CLONE_VFORK | SIGCHLD)
    time.sleep(30)
    os._exit(0)
time.sleep(30)
"""


# The default heartbeat, so the default 3 s lease (the tests' 0.6 s is shorter than one
# injection's deadline).
@pytest.mark.hmmd_args(*SLOW_POLL, "--uffd", "inject", "--heartbeat", "1s")
async def test_registers_of_targets_that_never_stop_hold_hmmd_up_once(hmmd, agent):
    """Six registers at once, each of a process that never stops for the injection: hmmd
    answers a bystander within the agents' 3 s lease, and every register succeeds (with
    the proc watcher). Each register's injection held the event loop ~2 s in turn (the six
    are handled in one turn), 12 s in all, and the agents' sessions were evicted."""
    from hmmirror.client.session import status

    targets = [
        subprocess.Popen([sys.executable, "-c", NEVER_STOPS], stdout=subprocess.PIPE,
                         start_new_session=True)
        for _ in range(6)
    ]  # fmt: skip
    try:
        where = []
        for proc in targets:
            assert proc.stdout is not None
            where.append(tuple(int(x) for x in proc.stdout.readline().split()))
        for proc in targets:  # each waits in vfork() now
            deadline = time.monotonic() + 10
            while _state(proc.pid) != "D":
                assert time.monotonic() < deadline, "a target never waited in vfork()"
                await asyncio.sleep(0.01)
        async with agent() as s:
            registers = asyncio.gather(
                *(s.mirror(pid, addr, PAGE, Access.READ) for pid, addr in where),
                return_exceptions=True,
            )
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            await status(hmmd.endpoint, timeout=30.0)
            held = time.monotonic() - t0
            results = await registers
            assert held < 3.0, f"a bystander's status waited {held:.1f} s"
            assert not [r for r in results if isinstance(r, BaseException)], results
            assert (await s.status())["uffd_watched"] == 0
    finally:
        for proc in targets:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()


def _state(pid: int) -> str:
    """``pid``'s state letter (D: uninterruptible, as in vfork())."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]
