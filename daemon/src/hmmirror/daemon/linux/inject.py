"""Non-cooperative attach: create a userfaultfd inside an unmodified target with ptrace.

The recipe of docs/ARCHITECTURE.md §A.3, x86-64 only: seize and interrupt the
target's main thread, check it is stopped on a ``syscall`` instruction, run
``userfaultfd()`` there, take the new fd with pidfd_getfd, run ``close()`` on
the target's copy, restore every register and detach. The target's interrupted
system call then restarts as if nothing happened, and its fd table is as
before. It is refused, with the reason, when the target is already traced or
runs under a seccomp filter (a forbidden syscall could kill it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import time

from hmmirror.daemon.linux import userfaultfd

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
_SYSCALL_INSN = b"\x0f\x05"
#: How long the target may take to stop at each step before the attempt is abandoned.
STOP_DEADLINE = 1.0
#: How many times the target is interrupted, looking for it blocked in a system call.
SYSCALL_ATTEMPTS = 50
# struct user_regs_struct (x86-64) field indexes.
_RAX, _RDI, _ORIG_RAX, _RIP = 10, 14, 15, 16


class InjectError(Exception):
    """Injection was refused or failed; the message says why, and the target is untouched."""


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


def _wait_stopped(pid: int) -> None:
    """Wait (bounded) until the tracee reports a stop."""
    deadline = time.monotonic() + STOP_DEADLINE
    while True:
        got, status = os.waitpid(pid, os.WNOHANG | WALL)
        if got == pid:
            if os.WIFSTOPPED(status):
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


def _call(pid: int, saved: _Regs, nr: int, arg0: int) -> int:
    """Run one system call in the stopped tracee at its ``syscall`` instruction."""
    regs = _Regs()
    ctypes.memmove(ctypes.byref(regs), ctypes.byref(saved), ctypes.sizeof(regs))
    r = regs.r
    r[_RIP] = saved.r[_RIP] - 2
    r[_RAX] = nr
    r[_RDI] = arg0
    r[_ORIG_RAX] = (1 << 64) - 1  # -1: no syscall-restart fixup on the way back in
    _ptrace(PTRACE_SETREGS, pid, 0, ctypes.addressof(regs))
    _ptrace(PTRACE_SINGLESTEP, pid)
    _wait_stopped(pid)
    _ptrace(PTRACE_GETREGS, pid, 0, ctypes.addressof(regs))
    ret = int(r[_RAX])
    return ret - (1 << 64) if ret >= 1 << 63 else ret


def _stop_in_syscall(pid: int) -> _Regs:
    """Interrupt the seized tracee where it sits in a system call; return its registers.

    A thread caught running user code is let go for a moment and caught again;
    most processes spend nearly all their time blocked in a system call.
    """
    for attempt in range(SYSCALL_ATTEMPTS):
        _ptrace(PTRACE_INTERRUPT, pid)
        _wait_stopped(pid)
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
    why = refusal(pid)
    if why is not None:
        raise InjectError(why)
    try:
        _ptrace(PTRACE_SEIZE, pid)
    except OSError as exc:
        raise InjectError(f"cannot trace process {pid}: {exc.strerror}") from exc
    try:
        saved = _stop_in_syscall(pid)
        try:
            flags = os.O_CLOEXEC | os.O_NONBLOCK
            fd = _call(pid, saved, userfaultfd.SYS_USERFAULTFD, flags)
            if fd == -1:  # EPERM: unprivileged userfaultfd is off; user-mode faults suffice
                fd = _call(
                    pid, saved, userfaultfd.SYS_USERFAULTFD, flags | userfaultfd.UFFD_USER_MODE_ONLY
                )
            if fd < 0:
                raise InjectError(f"userfaultfd() in process {pid} failed: {os.strerror(-fd)}")
            try:
                return userfaultfd.getfd(pidfd, fd)
            finally:
                _call(pid, saved, SYS_CLOSE, fd)
        finally:
            _ptrace(PTRACE_SETREGS, pid, 0, ctypes.addressof(saved))
    except OSError as exc:
        raise InjectError(f"injection into process {pid} failed: {exc}") from exc
    finally:
        _detach(pid)


def _detach(pid: int) -> None:
    """Detach, stopping the tracee first if it runs (PTRACE_DETACH needs it stopped).

    A tracee left attached would be reported to hmmd, not its parent, when it dies.
    """
    try:
        _ptrace(PTRACE_DETACH, pid)
        return
    except OSError:
        pass
    with contextlib.suppress(OSError, InjectError):  # gone, or it will not stop: nothing left
        _ptrace(PTRACE_INTERRUPT, pid)
        _wait_stopped(pid)
        _ptrace(PTRACE_DETACH, pid)
