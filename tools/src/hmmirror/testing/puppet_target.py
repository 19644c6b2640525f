"""The puppet target: a real process that runs its controller's commands with real syscalls.

hmmd watches live processes, so its tests need a process whose address space
changes for real. ``python -m hmmirror.testing.puppet_target --connect ADDR`` is
that process: it dials back to its controller (:class:`hmmirror.testing.puppet.Puppet`)
and executes commands with genuine system calls (``mmap``, ``munmap``,
``mprotect``, ``madvise``, ``mremap``, ``fork``, ``userfaultfd``, ``pwrite``...) and
genuine CPU loads and stores, one command at a time; the wire is described in
:mod:`hmmirror.testing.puppet_wire`. It uses only the standard library and ctypes.

CPU accesses are checked against ``/proc/self/maps`` first and fail with ``EFAULT``
instead of killing the puppet with SIGSEGV.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import platform
import select
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from hmmirror.testing.puppet_libc import (
    MADV,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_HUGETLB,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PR_SET_PDEATHSIG,
    SYS_USERFAULTFD,
    UFFD_USER_MODE_ONLY,
    DelayedMunmap,
    Libc,
    Userfault,
)
from hmmirror.testing.puppet_wire import ABSTRACT_PREFIX, DEFAULT_TIMEOUT, parse_prot, read_maps

__all__ = ["PuppetTarget", "main"]


class _Forked(Exception):
    """Raised in the child of ``fork``: it answers nothing on the parent's request."""


class PuppetTarget:
    """The process side: one connection, one command at a time."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.libc = Libc()
        self.handles: dict[int, Userfault | DelayedMunmap] = {}
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
            "announce": self.op_announce,
            "uffd_leave": self.op_uffd_leave,
        }

    def _dial(self) -> socket.socket:
        """Connect to the controller and announce our pid."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        addr = self.address
        if addr.startswith(ABSTRACT_PREFIX):
            addr = "\0" + addr[len(ABSTRACT_PREFIX) :]
        sock.connect(addr)
        sock.sendall(json.dumps({"hello": os.getpid()}).encode() + b"\n")
        return sock

    def die_with_parent(self) -> None:
        """PR_SET_PDEATHSIG: never outlive the process that started or forked us."""
        self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

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
        self.handles[h] = DelayedMunmap(self.libc, a["addr"], a["length"], a["delay_ns"])
        return h, b""

    def op_join(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """Wait for a ``munmap_later`` handle; return what its thread recorded."""
        job = self.handles.pop(a["handle"])
        if not isinstance(job, DelayedMunmap):
            raise OSError(errno.EINVAL, f"handle {a['handle']} is not a delayed munmap")
        return job.join(a.get("timeout", DEFAULT_TIMEOUT)), b""

    def op_uffd_register(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """Register [addr, +length) with userfaultfd, filled with ``fill``; return a handle."""
        h = self.next_handle
        self.next_handle += 1
        self.handles[h] = Userfault(self.libc, a["addr"], a["length"], a.get("fill", 0))
        return h, b""

    def _uffd(self, h: int) -> Userfault:
        """The userfaultfd registration of handle ``h``; EINVAL if it is not one."""
        job = self.handles.get(h)
        if not isinstance(job, Userfault):
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

    def op_announce(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """``BlockingAnnouncer(endpoint).sync_range(addr, addr + length)``: this process
        announces its own change; answers the endpoint of the hmmd that took it."""
        from hmmirror.client.target import BlockingAnnouncer

        with BlockingAnnouncer(a["endpoint"], timeout=a.get("timeout", 15.0)) as me:
            me.sync_range(a["addr"], a["addr"] + a["length"])
            return me.endpoint, b""

    def op_uffd_leave(self, a: dict[str, Any], _: bytes) -> tuple[Any, bytes]:
        """Create a userfaultfd and leave it open and unconfigured, for hmmd to take
        (user-mode-only where vm.unprivileged_userfaultfd = 0 refuses an unprivileged one)."""
        nr = SYS_USERFAULTFD.get(platform.machine())
        if nr is None:
            raise OSError(errno.ENOSYS, "userfaultfd syscall number unknown")
        flags = os.O_CLOEXEC | os.O_NONBLOCK
        fd = self.libc.syscall(nr, flags)
        if fd < 0:
            fd = self.libc.syscall(nr, flags | UFFD_USER_MODE_ONLY)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hmmirror.testing.puppet_target``."""
    parser = argparse.ArgumentParser(prog="python -m hmmirror.testing.puppet_target")
    parser.add_argument("--connect", required=True, help="controller address; '@name' = abstract")
    parser.add_argument("--no-pdeathsig", action="store_true", help="survive the controller")
    args = parser.parse_args(argv)
    target = PuppetTarget(args.connect)
    if not args.no_pdeathsig:
        target.die_with_parent()
    code = target.serve()
    sys.stdout.flush()
    sys.stderr.flush()
    # _exit: a forked child must not run the parent's atexit handlers or flush its buffers twice.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
