"""Userfaultfds credited to a process they do not belong to.

First, a userfaultfd offered by a process that exited: its pid is someone else's by then.

hmmd keeps an offered uffd for the process that sent it (SPEC.md §1.6), and knows that
process by the door's SO_PEERCRED pid, which the kernel records at connect(). A sender
that exits before hmmd reads its knock leaves that pid free, and the next process to
take it, of any user, would be credited with the sender's descriptor: mirrors of that
process would then be watched through a uffd of another mm, and miss its changes.

The attack is real: a second user connects to hmmd's door, leaves the connection and a
uffd with a child, and exits. The test gives the freed pid to a root process
(ns_last_pid, as checkpoint/restore tools steer pids), then the child sends the uffd.
hmmd must refuse it, knowing the sender by the door's pidfd (SO_PEERPIDFD), not its pid.

Third, a userfaultfd offered to whoever bound the intake's path first: only a process that
could ptrace the target gets it.

Second, a userfaultfd of another process's mm, left open in the target. A userfaultfd acts
on the mm of the process that created it, whoever holds it; hmmd takes one a target left
unconfigured (pidfd_getfd) or offered, and would register the target's ranges on the other
mm and wait there for events that never come. hmmd must find the target's own VMAs
registered once it registered them (smaps' ``uw``), or watch through /proc instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

#: The attacker: a uffd and a connection to the door (argv[1]); a child keeps both and
#: sends the uffd once told on stdin, then prints hmmd's answer. The parent prints its
#: own pid (the one SO_PEERCRED names) and exits.
SENDER = r"""
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
uffd = libc.syscall(323, os.O_CLOEXEC | 1)  # userfaultfd(UFFD_USER_MODE_ONLY), x86_64
if uffd < 0:
    sys.exit(f"userfaultfd: errno {ctypes.get_errno()}")
door = socket.socket(socket.AF_UNIX)
door.settimeout(20)
door.connect(sys.argv[1])
if os.fork() == 0:
    sys.stdin.readline()
    socket.send_fds(door, [b"uffd\n"], [uffd])
    print(door.recv(512).decode().strip(), flush=True)
    os._exit(0)
print(os.getpid(), flush=True)
"""


def spawn_with_pid(pid: int, tries: int = 50) -> subprocess.Popen[bytes]:
    """A root process given ``pid`` (free now), steering the allocator as CRIU does."""
    for _ in range(tries):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(["sleep", "60"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    pytest.fail(f"pid {pid} could not be given to a new process in {tries} tries")


@pytest.fixture
def sender(hmmd, hmmd_group, make_user) -> Iterator[subprocess.Popen[str]]:
    """The attacker's child, waiting on stdin, its parent (the connecting process) exited."""
    mallory = make_user(groups=(hmmd_group,))
    proc = mallory.popen(mallory.python(SENDER, hmmd.endpoint[len("ipc://") :]))
    yield proc
    if proc.stdin is not None:
        proc.stdin.close()


def test_a_uffd_sent_after_its_sender_exited_is_not_credited_to_the_pid_s_next_process(
    hmmd, sender
):
    proc = sender
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    assert line.strip().isdigit(), (line, proc.stderr.read() if proc.stderr else "")
    gone = int(line)
    assert proc.wait(timeout=20) == 0  # the connecting process is reaped: its pid is free
    victim = spawn_with_pid(gone)
    try:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        answer = proc.stdout.readline().strip()
        print(f"\nhmmd answered the uffd sent for pid {gone} (now root's sleep): {answer!r}")
        assert answer.startswith("error") and "gone" in answer, answer
    finally:
        victim.kill()
        victim.wait()


#: The second user's pair: Q makes a userfaultfd (inherited: no O_CLOEXEC) and a written
#: region, then forks P, which holds the uffd of Q's mm and has the same layout. Prints P's
#: pid and the region's address; both wait for stdin to close.
FOREIGN = r"""
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
uffd = libc.syscall(323, 1)  # userfaultfd(UFFD_USER_MODE_ONLY), x86_64
if uffd < 0:
    sys.exit(f"userfaultfd: errno {ctypes.get_errno()}")
region = mmap.mmap(-1, 16 * 4096)
region.write(b"q" * 16 * 4096)
addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
child = os.fork()
if child == 0:
    sys.stdin.read()
    os._exit(0)
print(child, addr, flush=True)
sys.stdin.read()
"""


async def test_a_uffd_of_another_mm_left_in_the_target_is_not_watched_through(
    hmmd, hmmd_group, make_user
):
    from hmmirror.client import connect

    mallory = make_user(groups=(hmmd_group,))
    pair = mallory.popen(mallory.python(FOREIGN))
    assert pair.stdout is not None and pair.stdin is not None
    words = pair.stdout.readline().split()
    assert len(words) == 2, pair.stderr.read() if pair.stderr else ""
    target, addr = int(words[0]), int(words[1])
    try:
        async with connect(hmmd.endpoint, name="root") as session:
            mirror = await session.mirror(target, addr, 16 * 4096)
            await mirror.fault(addr, 16)
            stats = await session.status()
        print(f"\nthe target holds a uffd of its parent's mm: uffd_watched {stats['uffd_watched']}")
        assert stats["uffd_watched"] == 0, "hmmd watches the target through another mm's uffd"
        assert "not this process's" in hmmd.stderr()
    finally:
        pair.kill()  # P goes with the user (make_user)
        pair.wait(timeout=20)


async def test_descriptors_hmmd_receives_are_close_on_exec(hmmd, puppet):
    """A descriptor a peer hands hmmd is hmmd's alone: one a program hmmd may start (the
    injector's helpers, a shell of an operator's hook) would otherwise inherit it."""
    await puppet.expose(hmmd.endpoint)  # kept as an offer: nothing mirrors the puppet yet
    kept = []
    for fd in os.listdir(f"/proc/{hmmd.proc.pid}/fd"):
        try:
            if os.readlink(f"/proc/{hmmd.proc.pid}/fd/{fd}") != "anon_inode:[userfaultfd]":
                continue
            with open(f"/proc/{hmmd.proc.pid}/fdinfo/{fd}") as f:
                flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
        except OSError:
            continue
        kept.append((fd, flags))
    assert kept, "hmmd kept no userfaultfd from the offer"
    assert all(flags & os.O_CLOEXEC for _, flags in kept), [(fd, oct(f)) for fd, f in kept]


#: A door lookalike, as another user: bind argv[1], take one knock, say whether a
#: userfaultfd came with it, answer ``ok``.
LOOKALIKE = r"""
import os, socket, sys
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sys.argv[1])
srv.listen(1)
print("listening", flush=True)
srv.settimeout(20)
try:
    conn, _ = srv.accept()
except TimeoutError:
    print("no knock", flush=True)
    sys.exit(0)
conn.settimeout(5)
try:
    msg, fds, _, _ = socket.recv_fds(conn, 256, 1)
except (OSError, TimeoutError):
    msg, fds = b"", []
got = [os.readlink(f"/proc/self/fd/{fd}") for fd in fds]
print("got", msg.strip().decode(errors="replace"), got, flush=True)
if msg:
    conn.send(b"ok\n")
"""


def test_a_uffd_is_offered_only_to_a_process_that_could_ptrace_the_target(make_user):
    """A target offers its userfaultfd to the intake at the path it was configured with. A
    userfaultfd lets its holder fill the target's pages: a second user who bound that path
    first (a shared directory) took it, and the target was told ``ok``. Now the target hands
    it only to a process that could ptrace it anyway (the kernel's rule), and says why not."""
    from hmmirror.daemon.linux import userfaultfd
    from hmmirror.transport.door import DoorError
    from hmmirror.transport.intake import offer

    shared = tempfile.mkdtemp(prefix="hmoffer-", dir="/tmp")
    os.chmod(shared, 0o1777)
    attacker = make_user()
    try:
        path = os.path.join(shared, "hmmd.sock")
        lookalike = attacker.popen(attacker.python(LOOKALIKE, path))
        assert lookalike.stdout is not None
        assert lookalike.stdout.readline().strip() == "listening", lookalike.stderr
        fd = userfaultfd.userfaultfd()
        try:
            with pytest.raises(DoorError, match="could not ptrace this one"):
                offer(path, fd, timeout=5.0)
        finally:
            os.close(fd)
        out, _ = lookalike.communicate(timeout=30)
        assert "anon_inode:[userfaultfd]" not in out, out
    finally:
        shutil.rmtree(shared, ignore_errors=True)
