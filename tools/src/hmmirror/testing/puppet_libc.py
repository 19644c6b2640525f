"""The puppet target's system calls: libc through ctypes, userfaultfd, a delayed munmap.

Only the target process (:mod:`hmmirror.testing.puppet_target`) imports this, and it
uses only the standard library and ctypes, so the puppet starts fast and needs
nothing installed but this package. The constants are the kernel's
(include/uapi/asm-generic/mman-common.h, include/uapi/linux/userfaultfd.h).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import select
import struct
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

from hmmirror.testing.puppet_wire import DEFAULT_TIMEOUT, PAGE_SIZE

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
SYS_USERFAULTFD: Final[Mapping[str, int]] = {"x86_64": 323, "aarch64": 282}
_UFFD_API: Final = 0xAA
UFFD_USER_MODE_ONLY: Final = 1
_UFFDIO_API: Final = 0xC018AA3F
_UFFDIO_REGISTER: Final = 0xC020AA00
_UFFDIO_UNREGISTER: Final = 0x8010AA01
_UFFDIO_COPY: Final = 0xC028AA03
_UFFDIO_REGISTER_MODE_MISSING: Final = 1
_UFFD_EVENT_PAGEFAULT: Final = 0x12
_UFFD_PAGEFAULT_FLAG_WRITE: Final = 1
_UFFD_MSG_SIZE: Final = 32

PR_SET_PDEATHSIG: Final = 1
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


class Libc:
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


def sleep_ns(libc: Libc, ns: int) -> None:
    """nanosleep(ns), as hmm-tests' ``hmm_nanosleep`` does (finer than time.sleep)."""
    ts = (ctypes.c_long * 2)(ns // 1_000_000_000, ns % 1_000_000_000)
    libc.nanosleep(ctypes.addressof(ts), None)


class Userfault:
    """A userfaultfd MISSING registration and the thread that resolves its faults.

    The handler runs on its own thread because a fault raised by another
    thread (or by a remote ``process_vm_readv``) blocks until UFFDIO_COPY.
    """

    def __init__(self, libc: Libc, addr: int, length: int, fill: int) -> None:
        nr = SYS_USERFAULTFD.get(platform.machine())
        if nr is None:
            machine = platform.machine()
            raise OSError(errno.ENOSYS, f"userfaultfd syscall number unknown on {machine}")
        flags = os.O_CLOEXEC | os.O_NONBLOCK
        fd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(flags))
        if fd == -1 and ctypes.get_errno() == errno.EPERM:
            fd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(flags | UFFD_USER_MODE_ONLY))
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


class DelayedMunmap:
    """A thread that sleeps ``delay_ns`` then munmaps, racing whatever happens meanwhile."""

    def __init__(self, libc: Libc, addr: int, length: int, delay_ns: int) -> None:
        self.result: dict[str, Any] = {}
        self._libc = libc
        self._thread = threading.Thread(
            target=self._run, args=(addr, length, delay_ns), name="munmap-later", daemon=True
        )
        self._thread.start()

    def _run(self, addr: int, length: int, delay_ns: int) -> None:
        """Thread body: sleep ``delay_ns``, munmap, record errno and timings in ``result``."""
        t0 = time.monotonic_ns()
        sleep_ns(self._libc, delay_ns)
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
