"""Non-cooperative attach: create a userfaultfd inside an unmodified target with ptrace.

The recipe of docs/ARCHITECTURE.md §A.3, x86-64 only: seize and interrupt the
target's main thread, check it is stopped on a ``syscall`` instruction, run
``userfaultfd()`` there, take the new fd with pidfd_getfd, run ``close()`` on
the target's copy, restore every register and detach. The target's interrupted
system call then restarts as if nothing happened, and its fd table is as
before. It is refused, with the reason, when the target is already traced or
runs under a seccomp filter (a forbidden syscall could kill it).

``populate_write`` runs ``madvise(MADV_POPULATE_WRITE)`` in the target the same
way: the write fault that breaks copy-on-write, which no other process can do
for it without racing its stores (SPEC.md §8). A target caught in user code,
not in a system call, runs it at a ``syscall`` instruction of its vDSO.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import platform
import signal
import threading
import time
from collections.abc import Collection, Sequence

from hmmirror.daemon.linux import userfaultfd
from hmmirror.daemon.linux.smaps import smaps_flags

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]

PTRACE_PEEKTEXT = 1
PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000
SYS_CLOSE = 3
SYS_MADVISE = 28
MADV_POPULATE_WRITE = 23
PTRACE_EVENT_STOP = 128
_SYSCALL_INSN = b"\x0f\x05"
#: How long the target may take to stop at each step before the attempt is abandoned.
STOP_DEADLINE = 1.0
#: How many times the target is interrupted, looking for it blocked in a system call; and
#: how many times at least an injected call is stepped while signals keep stopping the target
#: before it (each is held back and sent again after the detach)...
SYSCALL_ATTEMPTS = 50
#: ...and for how long (seconds): a target under a storm of signals needs more steps on a
#: busy host, and hmmd's event loop waits meanwhile (``injector.USER_BUDGET``).
STEP_DEADLINE = 0.05
#: The same for a call that undoes what an injected call did (closing the target's copy of
#: the userfaultfd just made): given up on, it would leave the target changed, so it gets
#: far longer. hmmd's loop waits for the helper only ``injector.USERFAULTFD_DEADLINE``; the
#: helper finishes the injection, and this undo, after hmmd stopped waiting.
CLEANUP_DEADLINE = 5.0
# struct user_regs_struct (x86-64) field indexes.
_RAX, _RDI, _ORIG_RAX, _RIP = 10, 14, 15, 16
_RSI, _RDX = 13, 12
#: One injection at a time: a second PTRACE_SEIZE of a process hmmd already traces would fail.
_seized = threading.Lock()


class InjectError(Exception):
    """Injection was refused or failed; the message says why, and the target is untouched."""


class CallFailed(InjectError):
    """The injected system call ran and failed: ``errno`` says how (the range changed under
    it, say); the target is as the call left it."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class _Regs(ctypes.Structure):
    """``struct user_regs_struct`` as 27 u64 values."""

    _fields_ = [("r", ctypes.c_ulonglong * 27)]


def _ptrace(request: int, pid: int, addr: int = 0, data: int | ctypes.c_void_p = 0) -> int:
    """ptrace(2); raise OSError on failure (PEEKTEXT's -1 checked through errno)."""
    ctypes.set_errno(0)
    ret = int(_libc.ptrace(request, pid, ctypes.c_void_p(addr), data))
    if ret == -1 and ctypes.get_errno():
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({request}) on {pid}: {os.strerror(err)}")
    return ret


def _wait_stopped(pid: int, signals: list[int] | None = None) -> None:
    """Wait (bounded) until the tracee reports a stop.

    A signal-delivery-stop counts as one, and its signal is noted in ``signals``
    (when given): resumed with none, the tracee would lose it.
    """
    deadline = time.monotonic() + STOP_DEADLINE
    while True:
        got, status = os.waitpid(pid, os.WNOHANG | WALL)
        if got == pid:
            if os.WIFSTOPPED(status):
                if signals is not None and _delivery_stop(status):
                    _note(signals, os.WSTOPSIG(status))
                return
            raise InjectError(f"process {pid} exited during injection")
        if time.monotonic() > deadline:
            raise InjectError(f"process {pid} did not stop within {STOP_DEADLINE:g} s")
        time.sleep(0.0005)


def refusal(pid: int) -> str | None:
    """Why injecting into ``pid`` must not be tried, or None."""
    if platform.machine() != "x86_64":
        return f"injection is implemented for x86_64 only, not {platform.machine()}"
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError as exc:
        return f"cannot read /proc/{pid}/status: {exc}"
    tracer = status.get("TracerPid", "0").strip()
    if tracer != "0":
        return f"process {pid} is already traced by pid {tracer}"
    if status.get("Seccomp", "0").strip() != "0":
        return f"process {pid} runs under seccomp, which may forbid or punish userfaultfd()"
    return None


#: VmFlags of a VMA registered with a userfaultfd (proc(5)): missing, minor, write-protect.
#: hmmd registers write-protection only.
_THEIRS_ONLY = frozenset((b"um", b"ui"))
_USERFAULTFD_FLAGS = _THEIRS_ONLY | {b"uw"}


def userfaultfd_refusal(
    pid: int, runs: Sequence[tuple[int, int]], ours: Collection[int] = ()
) -> str | None:
    """Why a write fault of ``runs`` in ``pid`` could wait on the target's own userfaultfd.

    Such a fault waits, killably only, until the target's handler answers, and that
    handler may be the very thread the injection holds: then the target and the
    injector wait for each other for good. Where the target's fd table holds a
    userfaultfd, its registered ranges are read from smaps (a page walk, so only then):
    a range registered for missing or minor faults is refused whoever registered it
    (hmmd never does), and one registered for write-protection too when the target
    holds a userfaultfd that is not hmmd's (inodes ``ours``; one the target left open
    for hmmd to take stays in its table). One the target handed to another process, or
    keeps in a thread's own fd table, is not seen: the deadline bounds what it costs.
    """
    table = userfaultfd.held(pid)
    if table is None:
        return f"cannot read the descriptors of process {pid}"
    if not table:
        return None
    own = {str(inode) for inode in ours}
    foreign = any(info.get("ino") not in own for info in table.values())
    refused = _USERFAULTFD_FLAGS if foreign else _THEIRS_ONLY
    try:
        registered = _userfaultfd_ranges(pid, refused)
    except (OSError, ValueError) as exc:
        return f"cannot read /proc/{pid}/smaps: {exc}"
    for lo, hi in registered:
        if any(addr < hi and lo < addr + length for addr, length in runs):
            return (
                f"process {pid} handles the page faults of {lo:#x}-{hi:#x} with its own "
                "userfaultfd: a write fault there could wait for ever"
            )
    return None


def _userfaultfd_ranges(pid: int, flags: frozenset[bytes]) -> list[tuple[int, int]]:
    """The [lo, hi) ranges of ``pid``'s VMAs whose smaps VmFlags hold one of ``flags``."""
    return [(lo, hi) for lo, hi, words in smaps_flags(pid) if flags & words]


def _set_call(pid: int, saved: _Regs, at: int, nr: int, args: Sequence[int]) -> _Regs:
    """Point the stopped tracee at the ``syscall`` instruction at ``at``, set up for ``nr``."""
    regs = _Regs()
    ctypes.memmove(ctypes.byref(regs), ctypes.byref(saved), ctypes.sizeof(regs))
    r = regs.r
    r[_RIP] = at
    r[_RAX] = nr
    for index, value in zip((_RDI, _RSI, _RDX), args, strict=False):
        r[index] = value
    r[_ORIG_RAX] = (1 << 64) - 1  # -1: no syscall-restart fixup on the way back in
    _ptrace(PTRACE_SETREGS, pid, 0, ctypes.addressof(regs))
    return regs


def _result(regs: _Regs) -> int:
    """The system call's return value, signed."""
    ret = int(regs.r[_RAX])
    return ret - (1 << 64) if ret >= 1 << 63 else ret


def _call(
    pid: int,
    saved: _Regs,
    nr: int,
    arg0: int,
    signals: list[int],
    deadline: float = STEP_DEADLINE,
) -> int:
    """Run one system call in the stopped tracee at its ``syscall`` instruction.

    Stepped as ``_step_call`` steps, for at least ``deadline`` seconds: a signal that stops
    the tracee before the call runs is noted in ``signals``, and the call is stepped again
    (read straight away, ``rax`` would still hold the call's number, not its result)."""
    at = saved.r[_RIP] - 2
    return _step_call(pid, at, _set_call(pid, saved, at, nr, (arg0,)), signals, deadline)


def _stop_in_syscall(pid: int, signals: list[int] | None = None) -> _Regs:
    """Interrupt the seized tracee where it sits in a system call; return its registers.

    A thread caught running user code is let go for a moment and caught again;
    most processes spend nearly all their time blocked in a system call.
    """
    for attempt in range(SYSCALL_ATTEMPTS):
        _ptrace(PTRACE_INTERRUPT, pid)
        _wait_stopped(pid, signals)
        saved = _Regs()
        _ptrace(PTRACE_GETREGS, pid, 0, ctypes.addressof(saved))
        word = _ptrace(PTRACE_PEEKTEXT, pid, saved.r[_RIP] - 2) & 0xFFFF
        if word.to_bytes(2, "little") == _SYSCALL_INSN:
            return saved
        if attempt + 1 < SYSCALL_ATTEMPTS:  # the last time it stays stopped, to be detached
            _ptrace(PTRACE_CONT, pid)
            time.sleep(0.002)
    raise InjectError(
        f"process {pid} was never caught in a system call ({SYSCALL_ATTEMPTS} tries); "
        "it may be spinning in user code"
    )


def inject_userfaultfd(pid: int, pidfd: int) -> int:
    """Create a userfaultfd in ``pid`` and return hmmd's copy of it; raise InjectError."""
    # Called on the event loop: never wait long for a COW break running on a copy worker.
    if not _seized.acquire(timeout=STOP_DEADLINE):
        raise InjectError(f"another injection kept hmmd busy for {STOP_DEADLINE:g} s")
    try:
        return _inject_userfaultfd(pid, pidfd)
    finally:
        _seized.release()


def _inject_userfaultfd(pid: int, pidfd: int) -> int:
    """``inject_userfaultfd`` under the lock."""
    why = refusal(pid)
    if why is not None:
        raise InjectError(why)
    try:
        _ptrace(PTRACE_SEIZE, pid)
    except OSError as exc:
        raise InjectError(f"cannot trace process {pid}: {exc.strerror}") from exc
    signals: list[int] = []
    try:
        still_theirs(pid, pidfd)
        saved = _stop_in_syscall(pid, signals)
        try:
            return _userfaultfd_call(pid, pidfd, saved, signals)
        finally:
            _ptrace(PTRACE_SETREGS, pid, 0, ctypes.addressof(saved))
    except OSError as exc:
        raise InjectError(f"injection into process {pid} failed: {exc}") from exc
    finally:
        _detach(pid)
        _send_again(pid, pidfd, signals)


def _userfaultfd_call(pid: int, pidfd: int, saved: _Regs, signals: list[int]) -> int:
    """Run ``userfaultfd()`` in the stopped tracee, take the fd, close the target's copy."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    nr = userfaultfd.SYS_USERFAULTFD
    fd = _call(pid, saved, nr, flags, signals)
    if fd == -errno.EPERM:  # unprivileged userfaultfd is off; user-mode faults suffice
        fd = _call(pid, saved, nr, flags | userfaultfd.UFFD_USER_MODE_ONLY, signals)
    if fd < 0:
        raise InjectError(f"userfaultfd() in process {pid} failed: {os.strerror(-fd)}")
    # From here on the target holds a userfaultfd it never asked for: its close must get
    # through, under a storm of signals too, or the injection would leave the target changed.
    try:
        ours = userfaultfd.getfd(pidfd, fd)
    except BaseException:
        _call(pid, saved, SYS_CLOSE, fd, signals, CLEANUP_DEADLINE)
        raise
    try:
        _call(pid, saved, SYS_CLOSE, fd, signals, CLEANUP_DEADLINE)
    except BaseException:
        os.close(ours)  # the injection failed: hmmd gets no fd, so none may stay open here
        raise
    return ours


def _detach(pid: int) -> None:
    """Detach, stopping the tracee first if it runs (PTRACE_DETACH needs it stopped).

    A tracee left attached would be reported to the tracer, not its parent, when it dies,
    and would freeze in the stop it was asked for. One that does not stop in time (its
    thread waits in ``vfork()``, say) is noted, and ``finish_detaches`` lets it go once it
    stops.
    """
    try:
        _ptrace(PTRACE_DETACH, pid)
        return
    except OSError:
        pass
    try:
        _ptrace(PTRACE_INTERRUPT, pid)
        _wait_stopped(pid)
        _ptrace(PTRACE_DETACH, pid)
    except ProcessLookupError:
        return  # gone: nothing left
    except (OSError, InjectError):
        _undetached.add(pid)


#: Tracees whose detach failed (they did not stop in time), to be let go when they stop.
_undetached: set[int] = set()


def finish_detaches() -> bool:
    """Detach each noted tracee that has stopped since (sending on the signal it stopped
    for, if any); whether any are left to wait for."""
    for pid in list(_undetached):
        try:
            got, status = os.waitpid(pid, os.WNOHANG | WALL)
        except ChildProcessError:
            _undetached.discard(pid)  # gone
            continue
        if got == 0:
            continue
        _undetached.discard(pid)
        if os.WIFSTOPPED(status):
            sig = os.WSTOPSIG(status) if _delivery_stop(status) else 0
            with contextlib.suppress(OSError):
                _ptrace(PTRACE_DETACH, pid, 0, sig)
    return bool(_undetached)


def _vdso_syscall(pid: int) -> int | None:
    """The address of a ``syscall`` instruction in ``pid``'s vDSO, or None (no vDSO).

    Any two bytes 0f 05 in executable memory run as ``syscall``; the vDSO's
    clock_gettime fallback has one on x86-64.
    """
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            line = next((x for x in f if x.rstrip().endswith(b"[vdso]")), None)
        if line is None:
            return None
        lo, hi = (int(x, 16) for x in line.split()[0].split(b"-"))
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        try:
            text = os.pread(fd, hi - lo, lo)
        finally:
            os.close(fd)
    except OSError:
        return None
    at = text.find(_SYSCALL_INSN)
    return None if at < 0 else lo + at


def _delivery_stop(status: int) -> bool:
    """A signal-delivery-stop: a signal on its way to the tracee, not a ptrace event or a trap."""
    return status >> 16 == 0 and os.WSTOPSIG(status) != signal.SIGTRAP


def _note(signals: list[int], sig: int) -> None:
    """Note a suppressed signal, to be sent again once detached: a standard signal once (the
    kernel keeps one of each pending anyway), a real-time one each time (they queue)."""
    if sig >= signal.SIGRTMIN or sig not in signals:
        signals.append(sig)


def _step_call(
    pid: int, at: int, regs: _Regs, signals: list[int], budget: float = STEP_DEADLINE
) -> int:
    """Single-step the tracee set up by ``_set_call`` through its system call; its result.

    Waits as long as the call takes, however long (a populate of a large range);
    only the target's exit ends the wait early. A signal that stops the tracee
    first is suppressed and noted in ``signals``, to be sent again once detached;
    after ``SYSCALL_ATTEMPTS`` such stops and ``budget`` seconds, the call is given up.
    """
    deadline = time.monotonic() + budget
    steps = 0
    while steps < SYSCALL_ATTEMPTS or time.monotonic() < deadline:
        steps += 1
        _ptrace(PTRACE_SINGLESTEP, pid)
        _, status = os.waitpid(pid, WALL)
        if not os.WIFSTOPPED(status):
            raise InjectError(f"process {pid} exited during injection")
        if _delivery_stop(status):
            _note(signals, os.WSTOPSIG(status))
        _ptrace(PTRACE_GETREGS, pid, 0, ctypes.addressof(regs))
        if regs.r[_RIP] == at + 2:
            return _result(regs)
        if regs.r[_RIP] != at:
            raise InjectError(f"process {pid} left the injected system call at {regs.r[_RIP]:#x}")
    raise InjectError(
        f"process {pid} kept stopping for signals before the injected system call "
        f"({steps} times in {budget * 1000:g} ms)"
    )


def still_theirs(pid: int, pidfd: int | None) -> None:
    """Raise ProcessLookupError unless the process of ``pidfd`` still lives: then the pid
    just seized is its own, not a reused one (a traced pid is not reused: it waits for us)."""
    if pidfd is None:
        return
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError as exc:
        raise ProcessLookupError(errno.ESRCH, f"process {pid} has exited") from exc
    except PermissionError:
        pass  # hmmd lacks CAP_KILL over another user's process: EPERM says it exists


def populate_write(
    pid: int,
    runs: Sequence[tuple[int, int]],
    pidfd: int | None = None,
    own_userfaultfds: Collection[int] = (),
) -> None:
    """``madvise(addr, length, MADV_POPULATE_WRITE)`` in ``pid`` for each (addr, length) run.

    The target's own write fault on each page: a page shared copy-on-write (with
    a fork child, the zero page, a file's page cache) is copied, and the target's
    stores meanwhile are never lost, as a write of the data from outside would lose
    them. Raises InjectError (refused), CallFailed (the madvise failed; the target's
    registers are restored either way) or ProcessLookupError (the process is gone, or
    ``pidfd``'s process, when given, no longer holds ``pid``). ``own_userfaultfds`` are the
    inodes of hmmd's userfaultfds of ``pid`` (``userfaultfd_refusal``).

    hmmd calls it through ``injector``, in a process that outlives hmmd.
    """
    why = refusal(pid) or userfaultfd_refusal(pid, runs, own_userfaultfds)
    if why is not None:
        raise InjectError(why)
    with _seized:
        try:
            _ptrace(PTRACE_SEIZE, pid)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise ProcessLookupError(exc.errno, f"process {pid} has exited") from exc
            raise InjectError(f"cannot trace process {pid}: {exc.strerror}") from exc
        signals: list[int] = []
        try:
            still_theirs(pid, pidfd)
            _populate_seized(pid, runs, signals)
        except OSError as exc:
            raise InjectError(f"madvise injection into process {pid} failed: {exc}") from exc
        finally:
            _detach(pid)
            _send_again(pid, pidfd, signals)


def _send_again(pid: int, pidfd: int | None, signals: list[int]) -> None:
    """Send the signals the injection suppressed, now the target is detached (through
    ``pidfd`` where there is one: the pid may be reused once the target exits)."""
    for sig in signals:
        try:
            if pidfd is None:
                os.kill(pid, sig)
            else:
                signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            return
        except OSError as exc:  # EPERM: the unit grants CAP_KILL for this (deploy/README.md)
            log.warning(
                "signal %d to process %d, held during an injection, lost: %s", sig, pid, exc
            )


def _populate_seized(pid: int, runs: Sequence[tuple[int, int]], signals: list[int]) -> None:
    """``populate_write``'s calls in the seized tracee, its registers restored after."""
    at = _vdso_syscall(pid)
    if at is None:
        saved = _stop_in_syscall(pid, signals)
        at = saved.r[_RIP] - 2
    else:
        _ptrace(PTRACE_INTERRUPT, pid)
        _wait_stopped(pid, signals)
        saved = _Regs()
        _ptrace(PTRACE_GETREGS, pid, 0, ctypes.addressof(saved))
    try:
        for addr, length in runs:
            regs = _set_call(pid, saved, at, SYS_MADVISE, (addr, length, MADV_POPULATE_WRITE))
            ret = _step_call(pid, at, regs, signals)
            if ret < 0:
                raise CallFailed(
                    -ret,
                    f"madvise({addr:#x}, {length:#x}, MADV_POPULATE_WRITE) in process {pid} "
                    f"failed: {os.strerror(-ret)}",
                )
    finally:
        _ptrace(PTRACE_SETREGS, pid, 0, ctypes.addressof(saved))
