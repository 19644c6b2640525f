"""A real target process for tests, driven by commands: the puppet.

hmmd watches live processes, so its tests need a process whose address space
changes for real. ``python -m hmmirror.testing.puppet --connect ADDR`` is that
process: it dials back to its controller and executes commands with genuine
system calls (``mmap``, ``munmap``, ``mprotect``, ``madvise``, ``mremap``,
``fork``, ``userfaultfd``, ``pwrite``...) and genuine CPU loads and stores. The
process side uses only the standard library and ctypes.

The controller side is :class:`Puppet`, an asyncio class::

    async with Puppet.spawn() as p:          # p.pid, p.start_time
        addr = await p.mmap(1 << 20, prot="rw")
        await p.write(addr, b"x" * 4096)
        child = await p.fork()               # a Puppet for the COW child
        await child.exit(0); assert await child.wait() == 0

Wire (one unix stream connection per process, on an abstract socket the
controller listens on; a forked child dials a fresh connection)::

    process -> controller   {"hello": pid}\\n                      once, on connect
    controller -> process   {"id": n, "op": "mmap", ...args, "nbytes": k}\\n  then k raw bytes
    process -> controller   {"id": n, "ok": true, "result": ..., "nbytes": k}\\n  then k raw bytes
                            {"id": n, "ok": false, "errno": e, "error": "..."}\\n

A failed system call comes back as :class:`OSError` with the kernel's errno.
CPU accesses (:meth:`Puppet.read`, :meth:`Puppet.write`) are checked against
``/proc/self/maps`` first and fail with ``EFAULT`` instead of killing the
puppet with SIGSEGV. Every wait is bounded by a deadline, and leaving
:meth:`Puppet.spawn` kills the process and every child it forked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import platform
import secrets
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["Puppet", "PuppetDied", "PuppetError", "Vma"]

PAGE_SIZE: Final = 4096

PROT_NONE: Final = 0x0
PROT_READ: Final = 0x1
PROT_WRITE: Final = 0x2
PROT_EXEC: Final = 0x4

MAP_SHARED: Final = 0x01
MAP_PRIVATE: Final = 0x02
MAP_FIXED: Final = 0x10
MAP_ANONYMOUS: Final = 0x20
MAP_NORESERVE: Final = 0x4000
MAP_POPULATE: Final = 0x8000
MAP_HUGETLB: Final = 0x40000
MAP_FIXED_NOREPLACE: Final = 0x100000

MREMAP_MAYMOVE: Final = 1
MREMAP_FIXED: Final = 2
MREMAP_DONTUNMAP: Final = 4

#: ``madvise`` advice by name (include/uapi/asm-generic/mman-common.h).
MADV: Final[Mapping[str, int]] = {
    "normal": 0,
    "random": 1,
    "sequential": 2,
    "willneed": 3,
    "dontneed": 4,
    "free": 8,
    "remove": 9,
    "dontfork": 10,
    "dofork": 11,
    "mergeable": 12,
    "unmergeable": 13,
    "hugepage": 14,
    "nohugepage": 15,
    "dontdump": 16,
    "dodump": 17,
    "wipeonfork": 18,
    "keeponfork": 19,
    "cold": 20,
    "pageout": 21,
    "populate_read": 22,
    "populate_write": 23,
    "collapse": 25,
}

# userfaultfd (include/uapi/linux/userfaultfd.h); ioctl numbers are _IOWR(0xAA, nr, struct).
_SYS_USERFAULTFD: Final[Mapping[str, int]] = {"x86_64": 323, "aarch64": 282}
_UFFD_API: Final = 0xAA
_UFFD_USER_MODE_ONLY: Final = 1
_UFFDIO_API: Final = 0xC018AA3F
_UFFDIO_REGISTER: Final = 0xC020AA00
_UFFDIO_UNREGISTER: Final = 0x8010AA01
_UFFDIO_COPY: Final = 0xC028AA03
_UFFDIO_REGISTER_MODE_MISSING: Final = 1
_UFFD_EVENT_PAGEFAULT: Final = 0x12
_UFFD_PAGEFAULT_FLAG_WRITE: Final = 1
_UFFD_MSG_SIZE: Final = 32

_PR_SET_PDEATHSIG: Final = 1
_MAP_FAILED: Final = ctypes.c_void_p(-1).value

#: Default deadline for one command, in seconds.
DEFAULT_TIMEOUT: Final = 10.0
_ABSTRACT_PREFIX: Final = "@"


class PuppetError(RuntimeError):
    """The puppet could not run a command for a reason other than a failed syscall."""


class PuppetDied(PuppetError):
    """The puppet's connection closed: the process exited or was killed."""


def parse_prot(prot: str | int) -> int:
    """Turn ``"rw"``, ``"r"``, ``"none"`` or ``""`` (or an int) into ``PROT_*`` bits."""
    if isinstance(prot, int):
        return prot
    bits = 0
    text = prot.lower()
    if text in ("none", ""):
        return PROT_NONE
    for ch in text:
        if ch == "r":
            bits |= PROT_READ
        elif ch == "w":
            bits |= PROT_WRITE
        elif ch == "x":
            bits |= PROT_EXEC
        elif ch != "-":
            raise ValueError(f"bad protection {prot!r}; use letters r, w, x or 'none'")
    return bits


@dataclass(frozen=True)
class Vma:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str
    offset: int
    path: str

    @property
    def readable(self) -> bool:
        """True if the VMA has ``r``."""
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        """True if the VMA has ``w``."""
        return self.perms[1] == "w"

    @property
    def shared(self) -> bool:
        """True for a ``MAP_SHARED`` VMA (``s``), False for private (``p``)."""
        return self.perms[3] == "s"


def read_maps(pid: int | str) -> list[Vma]:
    """Parse ``/proc/PID/maps`` (``pid`` may be ``"self"``)."""
    vmas: list[Vma] = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = parts[0].split("-")
            path = parts[5].rstrip("\n") if len(parts) > 5 else ""
            vmas.append(Vma(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), path))
    return vmas


def proc_start_time(pid: int) -> int:
    """Return field 22 (``starttime``, clock ticks since boot) of ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # comm (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[22 - 3])


# --- process side ---------------------------------------------------------------------------


class _Libc:
    """The few libc entry points the puppet calls, with errno capture."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(None, use_errno=True)
        vp, sz, i, lg = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_long
        self.mmap = lib.mmap
        self.mmap.restype = vp
        self.mmap.argtypes = [vp, sz, i, i, i, lg]
        self.munmap = lib.munmap
        self.munmap.restype = i
        self.munmap.argtypes = [vp, sz]
        self.mprotect = lib.mprotect
        self.mprotect.restype = i
        self.mprotect.argtypes = [vp, sz, i]
        self.madvise = lib.madvise
        self.madvise.restype = i
        self.madvise.argtypes = [vp, sz, i]
        self.mremap = lib.mremap
        self.mremap.restype = vp
        self.mremap.argtypes = [vp, sz, sz, i, vp]
        self.prctl = lib.prctl
        self.prctl.restype = i
        self.prctl.argtypes = [i, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        self.syscall = lib.syscall
        self.syscall.restype = lg
        self.nanosleep = lib.nanosleep
        self.nanosleep.restype = i
        self.nanosleep.argtypes = [vp, vp]

    @staticmethod
    def check(ret: int | None, what: str) -> int:
        """Raise OSError with the saved errno if ``ret`` is -1 / MAP_FAILED."""
        if ret is None or ret == -1 or ret == _MAP_FAILED:
            e = ctypes.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")
        return ret


def _sleep_ns(libc: _Libc, ns: int) -> None:
    """nanosleep(ns), as hmm-tests' ``hmm_nanosleep`` does (finer than time.sleep)."""
    ts = (ctypes.c_long * 2)(ns // 1_000_000_000, ns % 1_000_000_000)
    libc.nanosleep(ctypes.addressof(ts), None)


class _Userfault:
    """A userfaultfd MISSING registration and the thread that resolves its faults.

    The handler runs on its own thread because a fault raised by another
    thread (or by a remote ``process_vm_readv``) blocks until UFFDIO_COPY.
    """

    def __init__(self, libc: _Libc, addr: int, length: int, fill: int) -> None:
        nr = _SYS_USERFAULTFD.get(platform.machine())
        if nr is None:
            machine = platform.machine()
            raise OSError(errno.ENOSYS, f"userfaultfd syscall number unknown on {machine}")
        flags = os.O_CLOEXEC | os.O_NONBLOCK
        fd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(flags))
        if fd == -1 and ctypes.get_errno() == errno.EPERM:
            fd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(flags | _UFFD_USER_MODE_ONLY))
        self.fd = libc.check(fd, "userfaultfd")
        try:
            api = bytearray(struct.pack("=QQQ", _UFFD_API, 0, 0))
            fcntl.ioctl(self.fd, _UFFDIO_API, api, True)
            reg = bytearray(struct.pack("=QQQQ", addr, length, _UFFDIO_REGISTER_MODE_MISSING, 0))
            fcntl.ioctl(self.fd, _UFFDIO_REGISTER, reg, True)
        except BaseException:
            os.close(self.fd)
            raise
        self.addr, self.length = addr, length
        self.faults = 0
        self.write_faults = 0
        self.copies = 0
        self.errors: list[str] = []
        self._page = ctypes.create_string_buffer(bytes([fill]) * PAGE_SIZE, PAGE_SIZE)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="uffd-handler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """Handler thread: UFFDIO_COPY the fill page into each faulting page until stopped."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            try:
                msg = os.read(self.fd, _UFFD_MSG_SIZE)
            except BlockingIOError:
                continue
            except OSError as e:
                self.errors.append(f"read: {e}")
                return
            if len(msg) < _UFFD_MSG_SIZE or msg[0] != _UFFD_EVENT_PAGEFAULT:
                continue
            flags, address = struct.unpack_from("=QQ", msg, 8)
            self.faults += 1
            if flags & _UFFD_PAGEFAULT_FLAG_WRITE:
                self.write_faults += 1
            dst = address & ~(PAGE_SIZE - 1)
            copy = bytearray(
                struct.pack("=QQQQq", dst, ctypes.addressof(self._page), PAGE_SIZE, 0, 0)
            )
            try:
                fcntl.ioctl(self.fd, _UFFDIO_COPY, copy, True)
                self.copies += 1
            except OSError as e:
                # EEXIST: another fault on the same page was resolved first.
                if e.errno != errno.EEXIST:
                    self.errors.append(f"UFFDIO_COPY {dst:#x}: {e}")

    def stats(self) -> dict[str, Any]:
        """Counters of the handler thread."""
        return {
            "faults": self.faults,
            "write_faults": self.write_faults,
            "copies": self.copies,
            "errors": list(self.errors),
        }

    def close(self) -> None:
        """Stop the handler, unregister and close the userfaultfd."""
        os.write(self._stop_w, b"x")
        self._thread.join(DEFAULT_TIMEOUT)
        with contextlib.suppress(OSError):
            rng = bytearray(struct.pack("=QQ", self.addr, self.length))
            fcntl.ioctl(self.fd, _UFFDIO_UNREGISTER, rng, True)
        for fd in (self.fd, self._stop_r, self._stop_w):
            os.close(fd)


class _Delayed:
    """A thread that sleeps ``delay_ns`` then munmaps, racing whatever happens meanwhile."""

    def __init__(self, libc: _Libc, addr: int, length: int, delay_ns: int) -> None:
        self.result: dict[str, Any] = {}
        self._libc = libc
        self._thread = threading.Thread(
            target=self._run, args=(addr, length, delay_ns), name="munmap-later", daemon=True
        )
        self._thread.start()

    def _run(self, addr: int, length: int, delay_ns: int) -> None:
        """Thread body: sleep ``delay_ns``, munmap, record errno and timings in ``result``."""
        t0 = time.monotonic_ns()
        _sleep_ns(self._libc, delay_ns)
        t1 = time.monotonic_ns()
        ret = self._libc.munmap(addr, length)
        e = ctypes.get_errno() if ret != 0 else 0
        self.result = {"errno": e, "slept_ns": t1 - t0, "munmap_ns": time.monotonic_ns() - t1}

    def join(self, timeout: float) -> dict[str, Any]:
        """Wait for the thread; return its result (ETIMEDOUT if it is still running)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise OSError(errno.ETIMEDOUT, "munmap thread did not finish")
        return self.result


class _Target:
    """The process side: one connection, one command at a time."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.libc = _Libc()
        self.handles: dict[int, _Userfault | _Delayed] = {}
        self.next_handle = 1
        self.sock = self._dial()
        self.rfile = self.sock.makefile("rb")
        self.ops: dict[str, Callable[[dict[str, Any], bytes], tuple[Any, bytes]]] = {
            "ping": self.op_ping,
            "mmap": self.op_mmap,
            "munmap": self.op_munmap,
            "mprotect": self.op_mprotect,
            "madvise": self.op_madvise,
            "mremap": self.op_mremap,
            "write": self.op_write,
            "read": self.op_read,
            "open_tmpfile": self.op_open_tmpfile,
            "open": self.op_open,
            "close": self.op_close,
            "pwrite": self.op_pwrite,
            "pread": self.op_pread,
            "ftruncate": self.op_ftruncate,
            "fork": self.op_fork,
            "waitpid": self.op_waitpid,
            "munmap_later": self.op_munmap_later,
            "join": self.op_join,
            "uffd_register": self.op_uffd_register,
            "uffd_stats": self.op_uffd_stats,
            "uffd_close": self.op_uffd_close,
            "expose": self.op_expose,
            "uffd_leave": self.op_uffd_leave,
        }

    def _dial(self) -> socket.socket:
        """Connect to the controller and announce our pid."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        addr = self.address
        if addr.startswith(_ABSTRACT_PREFIX):
            addr = "\0" + addr[len(_ABSTRACT_PREFIX) :]
        sock.connect(addr)
        sock.sendall(json.dumps({"hello": os.getpid()}).encode() + b"\n")
        return sock

    def die_with_parent(self) -> None:
        """PR_SET_PDEATHSIG: never outlive the process that started or forked us."""
        self.libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    # -- memory access guards

    def _check_access(self, addr: int, length: int, write: bool) -> None:
        """Refuse with EFAULT an access that would SIGSEGV (hole, PROT_NONE, read-only)."""
        need = "w" if write else "r"
        pos, end = addr, addr + length
        for vma in read_maps("self"):
            if vma.end <= pos:
                continue
            if vma.start > pos:
                break
            if need not in vma.perms[:3]:
                break
            pos = vma.end
            if pos >= end:
                return
        if pos < end:
            raise OSError(errno.EFAULT, f"{'write' if write else 'read'} at {pos:#x} would fault")

    # -- ops; each returns (result, payload)

    def op_ping(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """Report our pid and parent pid."""
        return {"pid": os.getpid(), "ppid": os.getppid()}, b""

    def op_mmap(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """mmap with the given prot and flags (anonymous unless ``fd``); return the address."""
        flags = MAP_SHARED if a.get("shared") else MAP_PRIVATE
        fd = a.get("fd")
        if fd is None:
            fd = -1
            flags |= MAP_ANONYMOUS
        if a.get("hugetlb"):
            flags |= MAP_HUGETLB
        if a.get("populate"):
            flags |= MAP_POPULATE
        if a.get("noreserve"):
            flags |= MAP_NORESERVE
        hint = a.get("fixed")
        if hint is not None:
            flags |= MAP_FIXED_NOREPLACE if a.get("noreplace") else MAP_FIXED
        prot = parse_prot(a["prot"])
        ret = self.libc.mmap(hint, a["length"], prot, flags, fd, a.get("offset", 0))
        return self.libc.check(ret, "mmap"), b""

    def op_munmap(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """munmap [addr, +length)."""
        return self.libc.check(self.libc.munmap(a["addr"], a["length"]), "munmap"), b""

    def op_mprotect(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """mprotect [addr, +length) to ``prot``."""
        ret = self.libc.mprotect(a["addr"], a["length"], parse_prot(a["prot"]))
        return self.libc.check(ret, "mprotect"), b""

    def op_madvise(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """madvise [addr, +length) with ``advice``, a name from ``MADV`` or a number."""
        advice = a["advice"]
        code = advice if isinstance(advice, int) else MADV[advice]
        return self.libc.check(self.libc.madvise(a["addr"], a["length"], code), "madvise"), b""

    def op_mremap(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """mremap [addr, +old_length) to ``new_length``; return the new address."""
        flags = MREMAP_MAYMOVE if a.get("maymove", True) else 0
        new = a.get("fixed")
        if new is not None:
            flags |= MREMAP_FIXED | MREMAP_MAYMOVE
        if a.get("dontunmap"):
            flags |= MREMAP_DONTUNMAP | MREMAP_MAYMOVE
        ret = self.libc.mremap(a["addr"], a["old_length"], a["new_length"], flags, new)
        return self.libc.check(ret, "mremap"), b""

    def op_write(self, a: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
        """Store the payload at ``addr`` with CPU stores; return the bytes written."""
        self._check_access(a["addr"], len(data), write=True)
        # ctypes.memmove is a CFUNCTYPE call: it drops the GIL, so a userfaultfd
        # handler thread can resolve a fault this store raises.
        ctypes.memmove(a["addr"], data, len(data))
        return len(data), b""

    def op_read(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """Load ``length`` bytes at ``addr`` with CPU loads; they are the reply payload."""
        n = a["length"]
        self._check_access(a["addr"], n, write=False)
        buf = ctypes.create_string_buffer(n)
        ctypes.memmove(buf, a["addr"], n)
        return n, buf.raw

    def op_open_tmpfile(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """Create an unnamed O_TMPFILE of ``size`` bytes in ``dir``; return its fd."""
        fd = os.open(a.get("dir", "/tmp"), os.O_TMPFILE | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, a["size"])
        except BaseException:
            os.close(fd)
            raise
        return fd, b""

    def op_open(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """Open ``path`` (read-write unless ``write`` is false); return the fd."""
        flags = os.O_RDWR if a.get("write", True) else os.O_RDONLY
        if a.get("create"):
            flags |= os.O_CREAT
        return os.open(a["path"], flags, 0o600), b""

    def op_close(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """Close ``fd``."""
        os.close(a["fd"])
        return 0, b""

    def op_pwrite(self, a: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
        """pwrite the payload to ``fd`` at ``offset``; return the bytes written."""
        return os.pwrite(a["fd"], data, a.get("offset", 0)), b""

    def op_pread(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """pread ``length`` bytes of ``fd`` at ``offset``; they are the reply payload."""
        data = os.pread(a["fd"], a["length"], a.get("offset", 0))
        return len(data), data

    def op_ftruncate(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """Set the size of ``fd`` to ``size`` bytes."""
        os.ftruncate(a["fd"], a["size"])
        return 0, b""

    def op_fork(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """fork(): the parent returns the child's pid; the child dials its own connection."""
        pid = os.fork()
        if pid == 0:
            # The child: drop the parent's connection and the parent's threads'
            # state, then dial a connection of its own.
            self.rfile.close()
            self.sock.close()
            self.handles.clear()
            self.die_with_parent()
            self.sock = self._dial()
            self.rfile = self.sock.makefile("rb")
            raise _Forked
        return pid, b""

    def op_waitpid(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """Wait up to ``timeout`` for child ``pid`` to exit, reap it; return its status."""
        pid = a["pid"]
        pidfd = os.pidfd_open(pid)
        try:
            ready, _w, _x = select.select([pidfd], [], [], a.get("timeout", DEFAULT_TIMEOUT))
            if not ready:
                raise OSError(errno.ETIMEDOUT, f"child {pid} did not exit")
        finally:
            os.close(pidfd)
        _pid, status = os.waitpid(pid, 0)
        return {"status": status, "returncode": os.waitstatus_to_exitcode(status)}, b""

    def op_munmap_later(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """Start a thread that munmaps [addr, +length) after ``delay_ns``; return a handle."""
        h = self.next_handle
        self.next_handle += 1
        self.handles[h] = _Delayed(self.libc, a["addr"], a["length"], a["delay_ns"])
        return h, b""

    def op_join(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """Wait for a ``munmap_later`` handle; return what its thread recorded."""
        job = self.handles.pop(a["handle"])
        if not isinstance(job, _Delayed):
            raise OSError(errno.EINVAL, f"handle {a['handle']} is not a delayed munmap")
        return job.join(a.get("timeout", DEFAULT_TIMEOUT)), b""

    def op_uffd_register(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """Register [addr, +length) with userfaultfd, filled with ``fill``; return a handle."""
        h = self.next_handle
        self.next_handle += 1
        self.handles[h] = _Userfault(self.libc, a["addr"], a["length"], a.get("fill", 0))
        return h, b""

    def _uffd(self, h: int) -> _Userfault:
        """The userfaultfd registration of handle ``h``; EINVAL if it is not one."""
        job = self.handles.get(h)
        if not isinstance(job, _Userfault):
            raise OSError(errno.EINVAL, f"handle {h} is not a userfaultfd")
        return job

    def op_uffd_stats(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """The counters of a userfaultfd handle."""
        return self._uffd(a["handle"]).stats(), b""

    def op_uffd_close(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """Unregister and close a userfaultfd handle; return its final counters."""
        job = self._uffd(a["handle"])
        stats = job.stats()
        job.close()
        del self.handles[a["handle"]]
        return stats, b""

    def op_expose(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """``hmmirror.client.expose(endpoint)``: hand hmmd a userfaultfd of this process."""
        from hmmirror.client.target import expose

        expose(a["endpoint"], strict=a.get("strict", False))
        return None, b""

    def op_uffd_leave(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """Create a userfaultfd and leave it open and unconfigured, for hmmd to take
        (user-mode-only where vm.unprivileged_userfaultfd = 0 refuses an unprivileged one)."""
        nr = _SYS_USERFAULTFD.get(platform.machine())
        if nr is None:
            raise OSError(errno.ENOSYS, "userfaultfd syscall number unknown")
        flags = os.O_CLOEXEC | os.O_NONBLOCK
        fd = self.libc.syscall(nr, flags)
        if fd < 0:
            fd = self.libc.syscall(nr, flags | _UFFD_USER_MODE_ONLY)
        return self.libc.check(fd, "userfaultfd"), b""

    # -- loop

    def _reply(self, header: dict[str, Any], payload: bytes = b"") -> None:
        """Send one reply: the JSON header with ``nbytes`` set, then the payload."""
        header["nbytes"] = len(payload)
        self.sock.sendall(json.dumps(header).encode() + b"\n" + payload)

    def serve(self) -> int:
        """Run commands until ``exit`` or until the controller goes away."""
        while True:
            line = self.rfile.readline()
            if not line:
                return 0
            req = json.loads(line)
            payload = self.rfile.read(req.get("nbytes", 0)) if req.get("nbytes") else b""
            rid, op = req.get("id"), req.get("op")
            if op == "exit":
                self._reply({"id": rid, "ok": True, "result": os.getpid()})
                return int(req.get("code", 0))
            handler = self.ops.get(op) if isinstance(op, str) else None
            try:
                if handler is None:
                    raise OSError(errno.ENOSYS, f"unknown puppet op {op!r}")
                result, out = handler(req, payload)
            except _Forked:
                continue
            except OSError as e:
                self._reply({"id": rid, "ok": False, "errno": e.errno or 0, "error": str(e)})
                continue
            except Exception as e:
                self._reply({"id": rid, "ok": False, "errno": 0, "error": repr(e)})
                continue
            self._reply({"id": rid, "ok": True, "result": result}, out)


class _Forked(Exception):
    """Raised in the child of ``fork``: it answers nothing on the parent's request."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hmmirror.testing.puppet``."""
    parser = argparse.ArgumentParser(prog="python -m hmmirror.testing.puppet")
    parser.add_argument("--connect", required=True, help="controller address; '@name' = abstract")
    parser.add_argument("--no-pdeathsig", action="store_true", help="survive the controller")
    args = parser.parse_args(argv)
    target = _Target(args.connect)
    if not args.no_pdeathsig:
        target.die_with_parent()
    code = target.serve()
    sys.stdout.flush()
    sys.stderr.flush()
    # _exit: a forked child must not run the parent's atexit handlers or flush its buffers twice.
    os._exit(code)


# --- controller side ------------------------------------------------------------------------


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Hub:
    """The listening socket a puppet and every child it forks dial back to."""

    def __init__(self) -> None:
        self.name = f"hmmirror-puppet-{os.getpid()}-{secrets.token_hex(6)}"
        self.address = _ABSTRACT_PREFIX + self.name
        self._waiting: dict[int, asyncio.Future[Conn]] = {}
        self._arrived: dict[int, Conn] = {}
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        """Listen on the hub's abstract unix socket."""
        self._server = await asyncio.start_unix_server(self._on_connect, path="\0" + self.name)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read a process's hello; hand the connection to its ``claim``, or keep it."""
        self._writers.append(writer)
        try:
            async with asyncio.timeout(DEFAULT_TIMEOUT):
                line = await reader.readline()
            pid = int(json.loads(line)["hello"])
        except (TimeoutError, ValueError, KeyError, TypeError):
            writer.close()
            return
        fut = self._waiting.pop(pid, None)
        if fut is not None and not fut.done():
            fut.set_result((reader, writer))
        else:
            self._arrived[pid] = (reader, writer)

    async def claim(self, pid: int, timeout: float) -> Conn:
        """Wait for the connection of process ``pid``."""
        if pid in self._arrived:
            return self._arrived.pop(pid)
        fut: asyncio.Future[Conn] = asyncio.get_running_loop().create_future()
        self._waiting[pid] = fut
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise PuppetError(f"puppet pid {pid} did not connect within {timeout} s") from None
        finally:
            self._waiting.pop(pid, None)

    async def close(self) -> None:
        """Stop listening and close every puppet connection."""
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        for w in self._writers:
            with contextlib.suppress(Exception):
                await w.wait_closed()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


class Puppet:
    """Controller of one puppet process (the top one, or a child it forked).

    Create the top one with :meth:`spawn`; :meth:`fork` returns children. One
    command runs at a time per puppet; each is bounded by ``timeout`` seconds
    (:class:`TimeoutError` otherwise, after which the puppet is unusable).
    """

    def __init__(
        self,
        hub: _Hub,
        pid: int,
        conn: Conn,
        *,
        proc: asyncio.subprocess.Process | None = None,
        parent: Puppet | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._hub = hub
        self.pid = pid
        #: Field 22 of /proc/PID/stat: with the pid, the identity of this process.
        self.start_time = proc_start_time(pid)
        self._reader, self._writer = conn
        self._proc = proc
        self.parent = parent
        self.timeout = timeout
        self.children: list[Puppet] = []
        self.returncode: int | None = None
        self._lock = asyncio.Lock()
        self._next_id = 1
        self._broken: str | None = None
        self._exited = False

    def __repr__(self) -> str:
        return f"<Puppet pid={self.pid} start_time={self.start_time}>"

    # -- lifecycle

    @classmethod
    @contextlib.asynccontextmanager
    async def spawn(
        cls,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> AsyncIterator[Puppet]:
        """Start ``python -m hmmirror.testing.puppet``; kill it and its children on exit."""
        hub = _Hub()
        await hub.start()
        proc: asyncio.subprocess.Process | None = None
        puppet: Puppet | None = None
        try:
            full_env = dict(os.environ if env is None else env)
            # The child must import this very package, wherever it was imported from.
            pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            full_env["PYTHONPATH"] = os.pathsep.join(
                p for p in (pkg_root, full_env.get("PYTHONPATH", "")) if p
            )
            proc = await asyncio.create_subprocess_exec(
                python or sys.executable,
                "-m",
                "hmmirror.testing.puppet",
                "--connect",
                hub.address,
                stdin=asyncio.subprocess.DEVNULL,
                env=full_env,
            )
            conn = await cls._claim_or_died(hub, proc, timeout)
            puppet = cls(hub, proc.pid, conn, proc=proc, timeout=timeout)
            yield puppet
        finally:
            if puppet is not None:
                puppet._kill_tree()
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await proc.wait()
            await hub.close()

    @staticmethod
    async def _claim_or_died(hub: _Hub, proc: asyncio.subprocess.Process, timeout: float) -> Conn:
        """Wait for ``proc`` to connect; raise PuppetDied if it exits first."""
        claim = asyncio.ensure_future(hub.claim(proc.pid, timeout))
        died = asyncio.ensure_future(proc.wait())
        try:
            done, _ = await asyncio.wait({claim, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
        if claim in done:
            return claim.result()
        claim.cancel()
        raise PuppetDied(f"puppet pid {proc.pid} exited with {proc.returncode} before connecting")

    def _kill_tree(self) -> None:
        """SIGKILL every unreaped descendant still carrying its recorded identity."""
        for child in self.children:
            child._kill_tree()
        if self._proc is None and self.returncode is None:
            with contextlib.suppress(OSError, ValueError):
                if proc_start_time(self.pid) == self.start_time:
                    os.kill(self.pid, signal.SIGKILL)
        elif self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        self._writer.close()

    async def fork(self) -> Puppet:
        """fork() the puppet; return a Puppet controlling the child (COW copy of this mm)."""
        pid = int(await self._call("fork"))
        conn = await self._hub.claim(pid, self.timeout)
        child = Puppet(self._hub, pid, conn, parent=self, timeout=self.timeout)
        self.children.append(child)
        return child

    async def exit(self, code: int = 0) -> None:
        """Make the process exit with ``code`` (``os._exit``); then :meth:`wait` reaps it."""
        await self._call("exit", code=code)
        self._exited = True
        self._writer.close()

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to end; return its exit code (``-signal`` if killed)."""
        t = self.timeout if timeout is None else timeout
        if self.returncode is not None:
            return self.returncode
        if self._proc is not None:
            try:
                async with asyncio.timeout(t):
                    self.returncode = await self._proc.wait()
            except TimeoutError:
                raise TimeoutError(f"puppet pid {self.pid} did not exit within {t} s") from None
        else:
            if self.parent is None:
                raise PuppetError(f"puppet pid {self.pid} has no process handle and no parent")
            res = await self.parent._call("waitpid", pid=self.pid, timeout=t, deadline=t + 1.0)
            self.returncode = int(res["returncode"])
        return self.returncode

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process (checking its identity first)."""
        if proc_start_time(self.pid) != self.start_time:
            raise ProcessLookupError(f"pid {self.pid} is no longer this puppet")
        os.kill(self.pid, sig)

    # -- request / reply

    async def _call(
        self, op: str, payload: bytes = b"", *, deadline: float | None = None, **args: Any
    ) -> Any:
        """Run command ``op`` and return its result, dropping any reply payload."""
        result, _ = await self._call_bytes(op, payload, deadline=deadline, **args)
        return result

    async def _call_bytes(
        self, op: str, payload: bytes = b"", *, deadline: float | None = None, **args: Any
    ) -> tuple[Any, bytes]:
        """Run command ``op`` with ``payload``; return (result, reply payload)."""
        if self._broken is not None:
            raise PuppetError(f"puppet pid {self.pid} is unusable: {self._broken}")
        if self._exited:
            raise PuppetDied(f"puppet pid {self.pid} was told to exit")
        t = self.timeout if deadline is None else deadline
        async with self._lock:
            rid = self._next_id
            self._next_id += 1
            header = {"id": rid, "op": op, "nbytes": len(payload), **args}
            try:
                async with asyncio.timeout(t):
                    self._writer.write(json.dumps(header).encode() + b"\n")
                    if payload:
                        self._writer.write(payload)
                    await self._writer.drain()
                    line = await self._reader.readline()
                    if not line:
                        raise asyncio.IncompleteReadError(b"", None)
                    reply = json.loads(line)
                    n = int(reply.get("nbytes", 0))
                    data = await self._reader.readexactly(n) if n else b""
            except TimeoutError:
                self._broken = f"no reply to {op!r} within {t} s"
                raise TimeoutError(
                    f"puppet pid {self.pid}: no reply to {op!r} within {t} s; "
                    "it may or may not have run"
                ) from None
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                self._broken = f"connection lost during {op!r}"
                raise PuppetDied(
                    f"puppet pid {self.pid} went away during {op!r} "
                    f"(returncode {self._proc.returncode if self._proc else 'unknown'})"
                ) from e
        if reply.get("id") != rid:
            self._broken = f"reply id {reply.get('id')} for request {rid}"
            raise PuppetError(f"puppet pid {self.pid}: {self._broken}")
        if not reply.get("ok"):
            err = int(reply.get("errno") or 0)
            if err:
                raise OSError(err, f"puppet pid {self.pid} {op}: {reply.get('error')}")
            raise PuppetError(f"puppet pid {self.pid} {op}: {reply.get('error')}")
        return reply.get("result"), data

    # -- commands

    async def ping(self) -> dict[str, int]:
        """Round trip; returns the process's pid and ppid."""
        res: dict[str, int] = await self._call("ping")
        return res

    async def mmap(
        self,
        length: int,
        prot: str | int = "rw",
        *,
        shared: bool = False,
        hugetlb: bool = False,
        fd: int | None = None,
        offset: int = 0,
        fixed: int | None = None,
        noreplace: bool = False,
        populate: bool = False,
        noreserve: bool = False,
    ) -> int:
        """mmap(2); anonymous unless ``fd`` (a puppet-side fd, see :meth:`open_tmpfile`)."""
        addr: int = await self._call(
            "mmap",
            length=length,
            prot=prot,
            shared=shared,
            hugetlb=hugetlb,
            fd=fd,
            offset=offset,
            fixed=fixed,
            noreplace=noreplace,
            populate=populate,
            noreserve=noreserve,
        )
        return addr

    async def munmap(self, addr: int, length: int) -> None:
        """munmap(2)."""
        await self._call("munmap", addr=addr, length=length)

    async def mprotect(self, addr: int, length: int, prot: str | int) -> None:
        """mprotect(2); ``prot`` like ``"r"``, ``"rw"``, ``"none"``."""
        await self._call("mprotect", addr=addr, length=length, prot=prot)

    async def madvise(self, addr: int, length: int, advice: str | int) -> None:
        """madvise(2); ``advice`` is a name from :data:`MADV` (``"dontneed"``...) or a number."""
        await self._call("madvise", addr=addr, length=length, advice=advice)

    async def mremap(
        self,
        addr: int,
        old_length: int,
        new_length: int,
        *,
        maymove: bool = True,
        fixed: int | None = None,
        dontunmap: bool = False,
    ) -> int:
        """mremap(2); returns the new address."""
        new: int = await self._call(
            "mremap",
            addr=addr,
            old_length=old_length,
            new_length=new_length,
            maymove=maymove,
            fixed=fixed,
            dontunmap=dontunmap,
        )
        return new

    async def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """CPU stores of ``data`` at ``addr`` (memmove in the puppet)."""
        await self._call("write", bytes(data), addr=addr)

    async def read(self, addr: int, length: int) -> bytes:
        """CPU loads of ``length`` bytes at ``addr``; a load faults in the zero page."""
        _, data = await self._call_bytes("read", addr=addr, length=length)
        return data

    async def open_tmpfile(self, size: int, directory: str = "/tmp") -> int:
        """open(dir, O_TMPFILE|O_EXCL|O_RDWR) + ftruncate, as hmm-tests' ``hmm_create_file``.

        Returns the puppet-side fd for :meth:`mmap`, :meth:`pwrite`, :meth:`pread`.
        """
        fd: int = await self._call("open_tmpfile", size=size, dir=directory)
        return fd

    async def open(self, path: str, *, write: bool = True, create: bool = False) -> int:
        """open(2) a path in the puppet; returns the puppet-side fd."""
        fd: int = await self._call("open", path=path, write=write, create=create)
        return fd

    async def close(self, fd: int) -> None:
        """close(2) a puppet-side fd."""
        await self._call("close", fd=fd)

    async def pwrite(self, fd: int, data: bytes, offset: int = 0) -> int:
        """pwrite(2) on a puppet-side fd; returns the byte count."""
        n: int = await self._call("pwrite", bytes(data), fd=fd, offset=offset)
        return n

    async def pread(self, fd: int, length: int, offset: int = 0) -> bytes:
        """pread(2) on a puppet-side fd."""
        _, data = await self._call_bytes("pread", fd=fd, length=length, offset=offset)
        return data

    async def ftruncate(self, fd: int, size: int) -> None:
        """ftruncate(2) on a puppet-side fd."""
        await self._call("ftruncate", fd=fd, size=size)

    async def munmap_later(self, addr: int, length: int, delay_ns: int) -> int:
        """Start a thread that nanosleeps ``delay_ns`` then munmaps; returns a handle.

        This is hmm-tests' ``unmap_buffer`` thread; :meth:`join` collects the outcome.
        """
        h: int = await self._call("munmap_later", addr=addr, length=length, delay_ns=delay_ns)
        return h

    async def join(self, handle: int, timeout: float | None = None) -> dict[str, int]:
        """Wait for a :meth:`munmap_later` thread: ``{"errno", "slept_ns", "munmap_ns"}``."""
        t = self.timeout if timeout is None else timeout
        res: dict[str, int] = await self._call("join", handle=handle, timeout=t, deadline=t + 1.0)
        return res

    async def uffd_register(self, addr: int, length: int, fill: int = 0) -> int:
        """Register ``[addr, addr+length)`` with a userfaultfd in MISSING mode.

        A handler thread in the puppet resolves every fault with UFFDIO_COPY of
        a page filled with the byte ``fill``. Returns a handle.
        """
        h: int = await self._call("uffd_register", addr=addr, length=length, fill=fill)
        return h

    async def expose(self, endpoint: str, strict: bool = False) -> None:
        """Make the puppet call ``hmmirror.client.expose(endpoint, strict=strict)``."""
        await self._call("expose", endpoint=endpoint, strict=strict)

    async def uffd_leave(self) -> int:
        """Make the puppet create a userfaultfd it leaves unconfigured; returns its fd number."""
        fd: int = await self._call("uffd_leave")
        return fd

    async def uffd_stats(self, handle: int) -> dict[str, Any]:
        """``{"faults", "write_faults", "copies", "errors"}`` of a userfaultfd handler."""
        res: dict[str, Any] = await self._call("uffd_stats", handle=handle)
        return res

    async def uffd_close(self, handle: int) -> dict[str, Any]:
        """Stop the handler, unregister, close; returns the final stats."""
        res: dict[str, Any] = await self._call("uffd_close", handle=handle)
        return res

    # -- views from outside (the controller reads /proc directly)

    def maps(self) -> list[Vma]:
        """The process's ``/proc/PID/maps``."""
        return read_maps(self.pid)

    def vma_at(self, addr: int) -> Vma | None:
        """The VMA containing ``addr``, or None."""
        for vma in self.maps():
            if vma.start <= addr < vma.end:
                return vma
        return None

    def pagemap(self, addr: int, npages: int) -> list[int]:
        """Raw ``/proc/PID/pagemap`` entries (PFNs need CAP_SYS_ADMIN)."""
        with open(f"/proc/{self.pid}/pagemap", "rb") as f:
            f.seek((addr // PAGE_SIZE) * 8)
            raw = f.read(npages * 8)
        return list(struct.unpack(f"={npages}Q", raw))


if __name__ == "__main__":
    sys.exit(main())
