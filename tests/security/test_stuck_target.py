"""Row 15: a target whose pages never come in must not stall hmmd for anyone else.

The attacker is a real other user who mirrors its own process. That process
registered memory with its own userfaultfd and never serves it (or
write-protects it through that uffd and never lifts the protection), so any
copy hmmd makes into those pages blocks in the kernel for ever: a populate, a
DMA read, a DMA write, an atomic. At 6c59ac2 each such populate took one of the
few threads of the loop's default executor for good, after which no other
agent's fault on a page not yet present was ever answered; a blocked DMA write
or atomic stopped the event loop itself.

Now every copy runs on its target's worker with a deadline (``copy_deadline``,
1 s by default): the attacker's requests are answered EBUSY, the target's
later copies are refused at once, and a witness agent (another session,
mirroring an ordinary process) is served throughout.

A user can only make hmmd's copies wait on its uffd if that uffd handles faults
the kernel takes on another process's behalf: ``vm.unprivileged_userfaultfd=1``
or access to ``/dev/userfaultfd`` allow it. So that the test changes no system
setting, the target creates its uffd as root and then becomes the attacker for
good (all its uids and gids, no capabilities, dumpable again): from then on it
is an ordinary process of the attacker, mirrored by the attacker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hmmirror.client import Access
from hmmirror.client.session import status

from .test_deployment import SIGNALLED

PAGE = 4096
#: hmmd's default copy deadline (``copy_deadline``): the attacker's answers come by then.
COPY_DEADLINE = 1.0
#: Room on a loaded 2-vCPU machine for the answer to arrive after the deadline.
SLACK = 3.0
#: How long the witness's faults may take at most: generous, and far below "never".
WITNESS_DEADLINE = 5.0
#: Pages the attacker reads at once: more than the 6 threads 6c59ac2's executor had here.
ATTACK_PAGES = 16

# The target: makes its uffd while root, then drops to the attacker (argv: uid gid). Regions:
# "never" (MISSING, never served), "held" (MISSING, served on "serve"), "wp" (present,
# write-protected on "protect", released on "release"), "zap" (present until "zap", then
# MISSING and never served), all private anonymous memory (a zapped shmem page would stay in
# its page cache). Prints one JSON object per line; commands come on stdin.
TARGET = r"""
import ctypes, fcntl, json, mmap, os, select, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
PAGE = 4096
def iowr(nr, size):
    return (3 << 30) | (size << 16) | (0xAA << 8) | nr
API, REGISTER = iowr(0x3F, 24), iowr(0x00, 32)
ZEROPAGE, WRITEPROTECT = iowr(0x04, 32), iowr(0x06, 24)
MISSING, WP = 1, 2
fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)
if fd < 0:
    raise OSError(ctypes.get_errno(), "userfaultfd")
fcntl.ioctl(fd, API, bytearray(struct.pack("3Q", 0xAA, 0, 0)), True)
maps, at = {}, {}
for name, npages in (("never", 64), ("held", 4), ("wp", 4), ("zap", 4)):
    maps[name] = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    at[name] = ctypes.addressof(ctypes.c_char.from_buffer(maps[name]))
for name in ("wp", "zap"):
    maps[name].write(b"w" * len(maps[name]))
for name, mode in (("never", MISSING), ("held", MISSING), ("wp", WP), ("zap", MISSING)):
    arg = struct.pack("4Q", at[name], len(maps[name]), mode, 0)
    fcntl.ioctl(fd, REGISTER, bytearray(arg), True)
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: the credential change cleared it
def say(**kw):
    print(json.dumps(kw), flush=True)
def protect(on):
    arg = struct.pack("3Q", at["wp"], len(maps["wp"]), 1 if on else 0)
    fcntl.ioctl(fd, WRITEPROTECT, bytearray(arg), True)
say(pid=os.getpid(), **at)
held = []
while True:
    ready, _, _ = select.select([sys.stdin, fd], [], [])
    if fd in ready:
        try:
            data = os.read(fd, 32 * 64)
        except BlockingIOError:
            data = b""
        for off in range(0, len(data), 32):
            event, = struct.unpack_from("B", data, off)
            addr, = struct.unpack_from("Q", data, off + 16)
            if event == 0x12:
                page = addr & ~(PAGE - 1)
                if at["held"] <= page < at["held"] + len(maps["held"]):
                    held.append(page)
                say(fault=page)
    if sys.stdin in ready:
        cmd = sys.stdin.readline().strip()
        if not cmd:
            break
        if cmd == "protect":
            protect(True)
        elif cmd == "release":
            protect(False)
        elif cmd == "zap":
            libc.madvise(ctypes.c_void_p(at["zap"]), len(maps["zap"]), 4)  # MADV_DONTNEED
        elif cmd == "serve":
            for page in held:
                fcntl.ioctl(fd, ZEROPAGE, bytearray(struct.pack("4Q", page, PAGE, 0, 0)), True)
            held = []
        say(done=cmd)
"""

# The attacker's agent (argv: endpoint). Each stdin line is a JSON command with an "id"; each
# runs as its own task and answers one line {"id", "errno" (0: success), "seconds", ...}.
ATTACKER = r"""
import asyncio, errno, json, sys, time
from hmmirror.client import Access, AgentError, DeviceError, RequestTimeout, connect
from hmmirror.proto.messages import AtomicOp
PAGE = 4096
def say(**kw):
    print(json.dumps(kw), flush=True)
async def one(cmd, mirrors, s):
    t0 = time.monotonic()
    out = {}
    try:
        op = cmd["op"]
        if op == "mirror":
            length = cmd["npages"] * PAGE
            m = await s.mirror(cmd["pid"], cmd["addr"], length, Access.READ | Access.WRITE)
            mirrors[cmd["name"]] = m
        elif op == "read":
            r = await mirrors[cmd["name"]].read(cmd["addr"], 1)
            out["data"] = r.data[:4].hex()
        elif op == "fault":
            await mirrors[cmd["name"]].fault(cmd["addr"], 1, cmd.get("write", False))
        elif op == "write":
            await mirrors[cmd["name"]].write(cmd["addr"], b"A" * PAGE)
        elif op == "atomic":
            m = mirrors[cmd["name"]]
            out["old"] = await m.atomic(
                cmd["addr"], AtomicOp.FETCH_ADD, 1, 0, lambda a, n: m.fault(a, n, True)
            )
        code = 0
    except DeviceError as exc:
        code, out["error"] = exc.errno, str(exc)
    except RequestTimeout as exc:
        code, out["error"] = -1, f"timeout: {exc}"
    except (AgentError, OSError) as exc:
        code, out["error"] = -2, f"{type(exc).__name__}: {exc}"
    say(id=cmd["id"], errno=code, seconds=round(time.monotonic() - t0, 3), **out)
async def main(endpoint):
    loop = asyncio.get_running_loop()
    mirrors, tasks = {}, set()
    async with connect(endpoint, name="attacker", timeout=10.0) as s:
        say(ready=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip():
                break
            task = asyncio.ensure_future(one(json.loads(line), mirrors, s))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
asyncio.run(main(sys.argv[1]))
"""


class Lines:
    """JSON lines of a child's stdout, read on a thread, taken with a deadline."""

    def __init__(self, proc: subprocess.Popen[str], what: str) -> None:
        self.proc, self.what = proc, what
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self.kept: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # closed at teardown
            for line in self.proc.stdout:
                with contextlib.suppress(json.JSONDecodeError):
                    self.queue.put(json.loads(line))

    def take(self, match: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The first line ``match`` accepts (lines it skips are kept for later takes)."""
        for i, line in enumerate(self.kept):
            if match(line):
                return self.kept.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                err = self.proc.stderr.read() if self.proc.poll() is not None else ""  # type: ignore[union-attr]
                raise AssertionError(
                    f"{self.what}: no expected line in {timeout:g} s (exit {self.proc.poll()}) "
                    f"{err[-2000:]}"
                ) from None
            if match(line):
                return line
            self.kept.append(line)

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()


class Attacker:
    """The attacker's agent process: numbered commands, answers by id."""

    def __init__(self, lines: Lines) -> None:
        self.lines = lines
        self.next = 0

    def start(self, **cmd: Any) -> int:
        """Send a command; return its id (the answer comes with ``result``)."""
        self.next += 1
        self.lines.send(json.dumps({"id": self.next, **cmd}))
        return self.next

    def result(self, ident: int, timeout: float) -> dict[str, Any]:
        """The answer to command ``ident``."""
        return self.lines.take(lambda line: line.get("id") == ident, timeout)

    def do(self, timeout: float = 30.0, **cmd: Any) -> dict[str, Any]:
        """Send a command and wait for its answer."""
        return self.result(self.start(**cmd), timeout)


@pytest.fixture
def stuck_setup(
    hmmd: Any, hmmd_group: str, make_user: Callable[..., Any]
) -> Iterator[tuple[Lines, Attacker, dict[str, int], Any]]:
    """(target, attacker, the target's addresses, the attacking user), all running."""
    user = make_user(groups=(hmmd_group,))
    target_proc = subprocess.Popen(
        [sys.executable, "-c", TARGET, str(user.uid), str(user.gid)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        target = Lines(target_proc, "target")
        where = target.take(lambda line: "pid" in line, 20.0)
        agent = user.popen(user.python(ATTACKER, hmmd.endpoint))
        attacker = Attacker(Lines(agent, "attacker"))
        attacker.lines.take(lambda line: line.get("ready") is True, 20.0)
        yield target, attacker, where, user
    finally:
        if target_proc.poll() is None:
            target_proc.kill()
        target_proc.wait(10)
        for stream in (target_proc.stdin, target_proc.stdout, target_proc.stderr):
            assert stream is not None
            stream.close()


async def wait_counter(endpoint: str, key: str, at_least: int, timeout: float = 10.0) -> dict:
    """Poll hmmd's status until counter ``key`` reaches ``at_least``; return the status."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await status(endpoint, timeout=3.0)
        if int(stats[key]) >= at_least:
            return stats
        assert time.monotonic() < deadline, f"hmmd's {key} stayed at {stats[key]} < {at_least}"
        await asyncio.sleep(0.05)


async def witness_served(agent: Any, puppet: Any, what: str) -> None:
    """Another session faults pages of an ordinary process that are not present yet: each
    must be served within WITNESS_DEADLINE."""
    addr = await puppet.mmap(4 * PAGE, prot="rw")
    async with agent(name="witness") as session:
        mirror = await session.mirror(puppet.pid, addr, 4 * PAGE, Access.READ)
        for i in range(4):
            t0 = time.monotonic()
            try:
                got = await asyncio.wait_for(mirror.fault(addr + i * PAGE, 1), WITNESS_DEADLINE)
            except Exception as exc:
                raise AssertionError(
                    f"{what}: the witness's fault of a page not yet present was not served "
                    f"in {WITNESS_DEADLINE} s: {type(exc).__name__}: {exc}"
                ) from exc
            assert got == 1, f"{what}: witness fault installed {got} pages"
            assert time.monotonic() - t0 < WITNESS_DEADLINE
        await mirror.close()


def check_ebusy(answer: dict[str, Any], what: str, within: float) -> None:
    """The attacker's request was refused (EBUSY or EFAULT) within ``within`` seconds."""
    assert answer["errno"] in (16, 14), f"{what}: expected EBUSY/EFAULT, got {answer}"
    assert answer["seconds"] <= within, f"{what}: answered after {answer['seconds']} s > {within}"


async def test_blocking_target_stalls_only_its_own_faults(stuck_setup, hmmd, agent, puppet):
    """Row 15: 16 reads of never-served pages: EBUSY by the deadline, the witness served,
    later copies of that target refused at once, and no thread left once it exits."""
    target, attacker, where, _ = stuck_setup
    pid = where["pid"]
    attacker.do(op="mirror", name="never", pid=pid, addr=where["never"], npages=64)
    before = int((await status(hmmd.endpoint))["faults"])
    reads = [
        attacker.start(op="read", name="never", addr=where["never"] + i * PAGE)
        for i in range(ATTACK_PAGES)
    ]
    await wait_counter(hmmd.endpoint, "faults", before + ATTACK_PAGES)
    await witness_served(agent, puppet, "while 16 reads of a blocking target were in flight")
    for ident in reads:
        answer = attacker.result(ident, 30.0)
        check_ebusy(answer, "a read of a blocking page", COPY_DEADLINE + SLACK)
    # The worker is still blocked: another read of that target is refused at once.
    again = attacker.do(op="read", name="never", addr=where["never"] + 40 * PAGE)
    check_ebusy(again, "a read of a target whose copy is blocked", SLACK)
    stats = await status(hmmd.endpoint)
    assert stats["copy_stuck"] == 1 and stats["copy_timeouts"] >= 1, stats
    await witness_served(agent, puppet, "while the target's worker stayed blocked")
    # The target exits: the blocked call returns, and hmmd keeps no thread for it.
    target.proc.kill()
    deadline = time.monotonic() + 10.0
    while True:
        stats = await status(hmmd.endpoint)
        if stats["copy_stuck"] == 0 and stats["copy_threads"] == 0:
            break
        assert time.monotonic() < deadline, f"hmmd kept its copy threads: {stats}"
        await asyncio.sleep(0.1)


async def test_hmmd_exits_with_a_copy_still_blocked(stuck_setup, hmmd):
    """SIGTERM while a copy is blocked in a live target: hmmd exits 0 without waiting for it."""
    target, attacker, where, _ = stuck_setup
    attacker.do(op="mirror", name="never", pid=where["pid"], addr=where["never"], npages=64)
    for i in range(ATTACK_PAGES):
        attacker.start(op="read", name="never", addr=where["never"] + i * PAGE)
    target.take(lambda line: "fault" in line, 10.0)  # a copy is blocked in the target now
    hmmd.proc.send_signal(signal.SIGTERM)
    try:
        rc = hmmd.proc.wait(5.0)
    except subprocess.TimeoutExpired:
        raise AssertionError("hmmd did not exit in 5 s of SIGTERM with a copy blocked") from None
    assert rc == 0, f"hmmd exited with {rc}\n{hmmd.stderr()}"


async def test_blocked_write_and_atomic_answer_ebusy(stuck_setup, hmmd, agent, puppet):
    """A DMA write and an atomic whose pages are present at the check but write-protected
    by the target's own uffd: EBUSY by the deadline, hmmd serves everyone else, and the
    target's worker is usable again once the target lifts the protection."""
    target, attacker, where, _ = stuck_setup
    attacker.do(op="mirror", name="wp", pid=where["pid"], addr=where["wp"], npages=4)
    target.send("protect")
    target.take(lambda line: line.get("done") == "protect", 10.0)
    atomic = attacker.start(op="atomic", name="wp", addr=where["wp"])
    await wait_counter(hmmd.endpoint, "dma_atomics", 1)
    await witness_served(agent, puppet, "while an atomic was blocked in the target")
    answer = attacker.result(atomic, 30.0)
    check_ebusy(answer, "an atomic on a protected page", COPY_DEADLINE + SLACK)
    refused = attacker.do(op="write", name="wp", addr=where["wp"] + PAGE)
    check_ebusy(refused, "a write to a target whose copy is blocked", SLACK)
    # The target lifts its protection: the blocked write returns, the worker serves again.
    target.send("release")
    target.take(lambda line: line.get("done") == "release", 10.0)
    deadline = time.monotonic() + 10.0
    while (await status(hmmd.endpoint))["copy_stuck"]:
        assert time.monotonic() < deadline, "the worker stayed stuck after the release"
        await asyncio.sleep(0.05)
    ok = attacker.do(op="read", name="wp", addr=where["wp"] + 2 * PAGE)
    assert ok["errno"] == 0 and ok["data"] == b"wwww".hex(), ok
    # Protected again: a DMA write blocks in its copy, and is answered EBUSY by the deadline.
    target.send("protect")
    target.take(lambda line: line.get("done") == "protect", 10.0)
    writes = int((await status(hmmd.endpoint))["dma_writes"])
    write = attacker.start(op="write", name="wp", addr=where["wp"] + 3 * PAGE)
    await wait_counter(hmmd.endpoint, "dma_writes", writes + 1)
    await witness_served(agent, puppet, "while a DMA write was blocked in the target")
    check_ebusy(attacker.result(write, 30.0), "a write to a protected page", COPY_DEADLINE + SLACK)


@pytest.mark.hmmd_args("--copy-deadline", "3s", "--ack-deadline", "8s")
async def test_dma_read_present_at_the_check_then_blocked(stuck_setup, hmmd, agent, puppet):
    """A DMA read passes its check (the page is present and matches), waits behind a copy
    of the same target, and the page is zapped before its copy runs: the copy blocks in the
    target's uffd, and the read is answered EBUSY by its deadline; the witness is served."""
    target, attacker, where, _ = stuck_setup
    pid = where["pid"]
    attacker.do(op="mirror", name="zap", pid=pid, addr=where["zap"], npages=4)
    attacker.do(op="mirror", name="held", pid=pid, addr=where["held"], npages=4)
    first = attacker.do(op="read", name="zap", addr=where["zap"])  # translated and present
    assert first["errno"] == 0 and first["data"] == b"wwww".hex(), first
    # A fault of a page the target serves only when told: the target's worker waits in it.
    held = attacker.start(op="fault", name="held", addr=where["held"])
    target.take(lambda line: line.get("fault") == where["held"], 10.0)
    # The read's check passes now; its copy queues behind the held fault.
    reads = int((await status(hmmd.endpoint))["dma_reads"])
    read = attacker.start(op="read", name="zap", addr=where["zap"])
    t0 = time.monotonic()
    await wait_counter(hmmd.endpoint, "dma_reads", reads + 1)
    target.send("zap")
    target.take(lambda line: line.get("done") == "zap", 10.0)
    target.send("serve")
    target.take(lambda line: line.get("done") == "serve", 10.0)
    served = attacker.result(held, 10.0)
    assert served["errno"] == 0, f"the held fault failed (machine too slow?): {served}"
    target.take(lambda line: line.get("fault") == where["zap"], 10.0)  # the read's copy blocks
    await witness_served(agent, puppet, "while a DMA read was blocked in the target")
    answer = attacker.result(read, 30.0)
    assert time.monotonic() - t0 <= 3.0 + SLACK, answer
    check_ebusy(answer, "a DMA read whose page was zapped after its check", 3.0 + SLACK)
    stats = await status(hmmd.endpoint)
    assert stats["copy_stuck"] == 1, stats
    os.kill(pid, signal.SIGKILL)


async def test_write_fault_on_the_targets_own_userfaultfd_is_refused(
    stuck_setup, hmmd, agent, puppet
):
    """A write fault of pages the target's own userfaultfd handles: refused EFAULT at once.

    The write fault runs madvise(MADV_POPULATE_WRITE) in the target, on the thread the
    injector holds; that thread is also the one that serves the target's userfaultfd, so the
    madvise and the target would wait for each other for good. Before the refusal the
    target stopped answering, and the injector, blocked with it, held every other write
    fault back until its 60 s deadline: the witness's write fault was answered EBUSY."""
    target, attacker, where, _ = stuck_setup
    attacker.do(op="mirror", name="never", pid=where["pid"], addr=where["never"], npages=64)
    answer = attacker.do(op="fault", name="never", addr=where["never"], write=True)
    assert answer["errno"] == 14, f"expected EFAULT, got {answer}"
    assert "userfaultfd" in answer["error"] and answer["seconds"] <= SLACK, answer
    target.send("serve")
    target.take(lambda line: line.get("done") == "serve", 5.0)  # the target still runs
    addr = await puppet.mmap(4 * PAGE, prot="rw")
    async with agent(name="witness") as session:
        mirror = await session.mirror(puppet.pid, addr, 4 * PAGE, Access.READ | Access.WRITE)
        for i in range(4):
            got = await asyncio.wait_for(mirror.fault(addr + i * PAGE, 1, True), WITNESS_DEADLINE)
            assert got == 1, f"the witness's write fault installed {got} pages"
        await mirror.close()
    stats = await status(hmmd.endpoint)
    assert stats["copy_stuck"] == 0, stats


#: A target (root's: a userfaultfd that makes others' copies wait needs privilege) whose
#: 16 pages are registered for missing faults with a userfaultfd that only its child holds,
#: and that nobody serves: every fault there waits until the target dies. Prints pid, address.
HANDED_OFF = r"""
import ctypes, fcntl, mmap, os, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)
assert fd >= 0, ctypes.get_errno()
API, REGISTER = (3 << 30) | (24 << 16) | (0xAA << 8) | 0x3F, (3 << 30) | (32 << 16) | (0xAA << 8)
fcntl.ioctl(fd, API, bytearray(struct.pack("3Q", 0xAA, 0, 0)))
m = mmap.mmap(-1, 16 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
at = ctypes.addressof(ctypes.c_char.from_buffer(m))
fcntl.ioctl(fd, REGISTER, bytearray(struct.pack("4Q", at, 16 * 4096, 1, 0)))  # MISSING
if os.fork() == 0:
    while True:
        time.sleep(3600)  # holds the userfaultfd, never reads it
os.close(fd)
print(os.getpid(), at, flush=True)
while True:
    time.sleep(3600)
"""


def test_an_injection_blocked_in_one_users_process_holds_back_no_other_user(
    make_user: Callable[..., Any],
) -> None:
    """A write fault's injection waits for ever in one user's process (its userfaultfd is
    held by a child, out of the refusal's sight): another user's injections go on, each in
    time. With one helper for everyone, they waited behind it for its 60 s deadline."""
    from hmmirror.daemon.linux import injector

    user = make_user()
    blocked = subprocess.Popen(
        [sys.executable, "-c", HANDED_OFF], stdout=subprocess.PIPE, start_new_session=True
    )
    assert blocked.stdout is not None
    ordinary = subprocess.Popen(user.argv(sys.executable, "-c", SIGNALLED), stdout=subprocess.PIPE)
    assert ordinary.stdout is not None
    try:
        pid, addr = (int(x) for x in blocked.stdout.readline().split())
        other, other_addr = (int(x) for x in ordinary.stdout.readline().split())
        pidfd, other_fd = os.pidfd_open(pid), os.pidfd_open(other)
        ended: list[BaseException | None] = []

        def inject_blocked() -> None:
            try:
                injector.populate_write(pid, pidfd, [(addr, 16 * PAGE)])
                ended.append(None)
            except BaseException as exc:  # the target's death ends it
                ended.append(exc)

        worker = threading.Thread(target=inject_blocked, daemon=True)
        worker.start()
        time.sleep(0.5)
        assert not ended, f"the injection did not block: {ended}"
        t0 = time.monotonic()
        injector.populate_write(other, other_fd, [(other_addr, 4 * PAGE)])
        os.close(injector.inject_userfaultfd(other, other_fd))
        assert time.monotonic() - t0 < 5.0, "another user's injections waited"
        os.killpg(blocked.pid, signal.SIGKILL)  # the blocked madvise waits killably
        worker.join(10)
        assert ended and ended[0] is not None, "the blocked injection never ended"
        os.close(pidfd)
        os.close(other_fd)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(blocked.pid, signal.SIGKILL)
        ordinary.kill()
        injector.INJECTORS.close()
        for proc in (blocked, ordinary):
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
