"""The puppet's controller: :class:`Puppet` drives a real target process from asyncio.

hmmd watches live processes, so its tests need a process whose address space
changes for real: :meth:`Puppet.spawn` starts one (``python -m
hmmirror.testing.puppet_target``, see :mod:`hmmirror.testing.puppet_target`) and
each method runs one genuine system call or CPU access in it::

    async with Puppet.spawn() as p:          # p.pid, p.start_time
        addr = await p.mmap(1 << 20, prot="rw")
        await p.write(addr, b"x" * 4096)
        child = await p.fork()               # a Puppet for the COW child
        await child.exit(0); assert await child.wait() == 0

A failed system call comes back as :class:`OSError` with the kernel's errno
(the wire: :mod:`hmmirror.testing.puppet_wire`). Every wait is bounded by a
deadline, and leaving :meth:`Puppet.spawn` kills the process and every child it
forked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

from hmmirror.daemon.linux.procfs import start_time
from hmmirror.testing.puppet_hub import Conn, PuppetHub
from hmmirror.testing.puppet_wire import (
    DEFAULT_TIMEOUT,
    PAGE_SIZE,
    PuppetDied,
    PuppetError,
    Vma,
    read_maps,
)

__all__ = ["Puppet", "PuppetDied", "PuppetError", "Vma"]


class Puppet:
    """Controller of one puppet process (the top one, or a child it forked).

    Create the top one with :meth:`spawn`; :meth:`fork` returns children. One
    command runs at a time per puppet; each is bounded by ``timeout`` seconds
    (:class:`TimeoutError` otherwise, after which the puppet is unusable).
    """

    def __init__(
        self,
        hub: PuppetHub,
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
        self.start_time = start_time(pid)
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
        """Start ``python -m hmmirror.testing.puppet_target``; kill it and its children on exit."""
        hub = PuppetHub()
        await hub.start()
        proc: asyncio.subprocess.Process | None = None
        puppet: Puppet | None = None
        try:
            proc = await hub.start_process(python or sys.executable, env)
            conn = await hub.claim_or_died(proc, timeout)
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

    def _kill_tree(self) -> None:
        """SIGKILL every unreaped descendant still carrying its recorded identity."""
        for child in self.children:
            child._kill_tree()
        if self._proc is None and self.returncode is None:
            with contextlib.suppress(OSError, ValueError):
                if start_time(self.pid) == self.start_time:
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
        if start_time(self.pid) != self.start_time:
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
        """madvise(2); ``advice`` is a number or a name (``"dontneed"``...) from
        :data:`~hmmirror.testing.puppet_libc.MADV`."""
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

    async def announce(self, endpoint: str, addr: int, length: int) -> str:
        """Make the puppet announce a CLEAR of its own [addr, addr + length) through
        ``BlockingAnnouncer(endpoint)``; the endpoint of the hmmd that took it."""
        served: str = await self._call("announce", endpoint=endpoint, addr=addr, length=length)
        return served

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
