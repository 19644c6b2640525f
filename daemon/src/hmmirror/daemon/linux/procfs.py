"""/proc readers: process identity, VMAs from maps, and raw pagemap entries.

pagemap bits (Documentation/admin-guide/mm/pagemap.rst): 63 present, 62
swapped, 61 file-page or shared-anon, 57 uffd-wp, 56 exclusively mapped, 55
soft-dirty, 0..54 PFN (visible only with CAP_SYS_ADMIN at open time).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

PM_PRESENT = np.uint64(1 << 63)
PM_SWAPPED = np.uint64(1 << 62)
PM_FILE = np.uint64(1 << 61)
PM_UFFD_WP = np.uint64(1 << 57)
PM_EXCLUSIVE = np.uint64(1 << 56)
PM_PFN_MASK = np.uint64((1 << 55) - 1)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

Raw = npt.NDArray[np.uint64]


def start_time(pid: int) -> int:
    """Return the process start time in clock ticks since boot (``/proc/PID/stat`` field 22).

    Raises ``ProcessLookupError`` when the process does not exist.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessLookupError(pid, f"no process {pid}") from exc
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


@dataclass(frozen=True)
class Vmas:
    """The VMAs of a process, as parallel sorted arrays (one row per maps line)."""

    starts: npt.NDArray[np.uint64]
    ends: npt.NDArray[np.uint64]
    readable: npt.NDArray[np.bool_]
    writable: npt.NDArray[np.bool_]
    shared: npt.NDArray[np.bool_]
    special: npt.NDArray[np.bool_]
    """VM_IO/VM_PFNMAP-like mappings hmm refuses: [vvar], [vsyscall] and device mappings."""
    keys: tuple[bytes, ...]
    """The maps lines, for diffing two reads (empty for ``maps_range``)."""
    """The whole maps line of each VMA: a change in it means the VMA changed."""


_SPECIAL_NAMES = (b"[vvar]", b"[vsyscall]", b"[vvar_vclock]")


def real_uid(pid: int) -> int:
    """The real uid of process ``pid`` (the user who controls whether its pages block, and
    who may change its mappings), or -1 if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _special(name: bytes) -> bool:
    """Whether a VMA of this name is one hmm refuses (vvar, vsyscall, a device mapping)."""
    device = name.startswith(b"/dev/") and not name.startswith((b"/dev/zero", b"/dev/shm/"))
    return name in _SPECIAL_NAMES or device


#: ``_IOWR('f', 17, struct procmap_query)`` (include/uapi/linux/fs.h, Linux 6.11+).
PROCMAP_QUERY = 0xC0686611
_QUERY = struct.Struct("<QQQQQQQQQIIIIQQ")
_COVERING_OR_NEXT_VMA = 0x10
_VMA_READABLE, _VMA_WRITABLE, _VMA_SHARED = 0x1, 0x2, 0x8
_NAME_MAX = 4096


def parse_maps(text: bytes) -> Vmas:
    """Parse ``/proc/PID/maps`` text."""
    starts: list[int] = []
    ends: list[int] = []
    readable: list[bool] = []
    writable: list[bool] = []
    shared: list[bool] = []
    special: list[bool] = []
    keys: list[bytes] = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, _, hi = parts[0].partition(b"-")
        perms = parts[1]
        name = parts[5].strip() if len(parts) > 5 else b""
        starts.append(int(lo, 16))
        ends.append(int(hi, 16))
        readable.append(perms[0:1] == b"r")
        writable.append(perms[1:2] == b"w")
        shared.append(perms[3:4] == b"s")
        special.append(_special(name))
        keys.append(line)
    return Vmas(
        np.array(starts, dtype=np.uint64),
        np.array(ends, dtype=np.uint64),
        np.array(readable, dtype=np.bool_),
        np.array(writable, dtype=np.bool_),
        np.array(shared, dtype=np.bool_),
        np.array(special, dtype=np.bool_),
        tuple(keys),
    )


#: Reads of at least this many entries (256 MiB of VA) are shared with a helper thread.
SPLIT_PAGES = 1 << 16
#: Entries per read once a read is shared: each thread takes the next piece as it comes free.
PIECE_PAGES = 1 << 15
_READER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagemap")

#: Called with [lo, hi), in entries, once those entries of a read have landed.
Landed = Callable[[int, int], None]


def _read_fully(fd: int, view: memoryview, off: int) -> None:
    """preadv until ``view`` is full; zero what lies past the end of the address space."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], off + done)
        if n <= 0:
            view[done:] = b"\0" * (len(view) - done)
            return
        done += n


def _read_pieces(
    fd: int, view: memoryview, off: int, pieces: Iterator[int], npages: int, landed: Landed | None
) -> None:
    """Read the pieces ``pieces`` yields (shared with another thread: ``next`` on a range
    iterator is atomic) and report each one."""
    for lo in pieces:
        hi = min(npages, lo + PIECE_PAGES)
        _read_fully(fd, view[lo * 8 : hi * 8], off + lo * 8)
        if landed is not None:
            landed(lo, hi)


class ProcessView:
    """Open handles on one process's maps and pagemap, kept for the process's lifetime.

    The pagemap fd pins the mm that was current at open time, so a reused pid
    can never be read through it.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._query = bytearray(_QUERY.size)
        self._name = ctypes.create_string_buffer(_NAME_MAX)
        self._can_query = True
        self._maps_fd = os.open(f"/proc/{pid}/maps", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._pagemap_fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(self._maps_fd)
            raise

    @property
    def pagemap_fd(self) -> int:
        """The open pagemap file descriptor (for PAGEMAP_SCAN)."""
        return self._pagemap_fd

    def close(self) -> None:
        """Close both descriptors; idempotent."""
        for fd in (self._maps_fd, self._pagemap_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._maps_fd = self._pagemap_fd = -1

    def maps(self) -> Vmas:
        """Read and parse the current maps (raises ProcessLookupError once the process is gone)."""
        chunks = []
        try:
            os.lseek(self._maps_fd, 0, os.SEEK_SET)
            while True:
                chunk = os.read(self._maps_fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError as exc:
            raise ProcessLookupError(
                self.pid, f"process {self.pid} maps unreadable: {exc}"
            ) from exc
        return parse_maps(b"".join(chunks))

    def _query_vma(self, addr: int) -> tuple[int, int, int, bytes] | None:
        """PROCMAP_QUERY: the first VMA ending above ``addr`` as (start, end, flags, name).

        None when there is none. Raises ProcessLookupError when the mm is gone,
        and OSError(ENOTTY) on kernels without the ioctl.
        """
        buf = self._query
        _QUERY.pack_into(
            buf, 0, _QUERY.size, _COVERING_OR_NEXT_VMA, addr, 0, 0, 0, 0, 0, 0, 0, 0,
            _NAME_MAX, 0, ctypes.addressof(self._name), 0,
        )  # fmt: skip
        try:
            fcntl.ioctl(self._maps_fd, PROCMAP_QUERY, buf, True)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            if exc.errno in (errno.ESRCH, errno.EBADF):
                raise ProcessLookupError(self.pid, f"process {self.pid} is gone") from exc
            raise
        f = _QUERY.unpack_from(buf)
        name_size = f[11]
        return f[3], f[4], f[5], self._name.raw[: name_size - 1] if name_size else b""

    def maps_range(self, start: int, end: int) -> Vmas:
        """The VMAs that intersect [start, end), by PROCMAP_QUERY lookups (one per VMA).

        Far cheaper than ``maps()`` for the few VMAs a fault or DMA touches in a
        process with thousands; falls back to ``maps()`` where the ioctl is missing.
        """
        if not self._can_query:
            return self.maps()
        rows: list[tuple[int, int, int, bytes]] = []
        addr = start
        try:
            while addr < end:
                vma = self._query_vma(addr)
                if vma is None or vma[0] >= end:
                    break
                rows.append(vma)
                addr = vma[1]
        except OSError as exc:
            if isinstance(exc, ProcessLookupError) or exc.errno not in (errno.ENOTTY, errno.EINVAL):
                raise
            self._can_query = False
            return self.maps()
        return Vmas(
            np.array([r[0] for r in rows], dtype=np.uint64),
            np.array([r[1] for r in rows], dtype=np.uint64),
            np.array([bool(r[2] & _VMA_READABLE) for r in rows], dtype=np.bool_),
            np.array([bool(r[2] & _VMA_WRITABLE) for r in rows], dtype=np.bool_),
            np.array([bool(r[2] & _VMA_SHARED) for r in rows], dtype=np.bool_),
            np.array([_special(r[3]) for r in rows], dtype=np.bool_),
            (),  # keys identify maps lines for diffs; a range lookup is never diffed
        )

    def replaced(self) -> bool:
        """Whether the mm these handles pin is gone: execve replaced it, or the process died.

        A live mm always has VMAs, so finding none through our (old) descriptor means
        the process now runs in another mm, even though its pid and start time are the same.
        """
        try:
            if self._can_query:
                return self._query_vma(0) is None
            return len(self.maps().starts) == 0
        except ProcessLookupError:
            return True
        except OSError as exc:
            if exc.errno not in (errno.ENOTTY, errno.EINVAL):
                raise
            self._can_query = False
            return self.replaced()

    def pagemap(self, start: int, npages: int) -> Raw:
        """Read ``npages`` raw pagemap entries from virtual address ``start``, on this thread
        alone: the watchers' reads run beside faults and must leave them a CPU."""
        # np.empty, not zeros: preadv overwrites it all.
        out = np.empty(npages, dtype=np.uint64)
        self.pagemap_into(out, start)
        return out

    def pagemap_into(
        self, out: Raw, start: int, landed: Landed | None = None, *, shared: bool = False
    ) -> None:
        """Read ``len(out)`` raw pagemap entries from virtual address ``start`` into ``out``.

        ``landed(lo, hi)`` is called once entries [lo, hi) are in, on the thread
        that read them, so that the caller's work on one piece overlaps the read
        of the next. With ``shared``, a large read is shared with a helper thread
        (preadv and numpy both let go of the GIL), piece by piece as each thread
        comes free: on a busy machine the caller does it all rather than wait
        for a CPU. Raises ProcessLookupError when the pagemap cannot be read.
        """
        npages = len(out)
        if npages == 0:
            return
        view = out.data.cast("B")
        off = (start >> PAGE_SHIFT) * 8
        fd = self._pagemap_fd
        try:
            if not shared or npages < SPLIT_PAGES:
                _read_pieces(fd, view, off, iter(range(0, npages, PIECE_PAGES)), npages, landed)
                return
            pieces = iter(range(0, npages, PIECE_PAGES))
            helper = _READER.submit(_read_pieces, fd, view, off, pieces, npages, landed)
            try:
                _read_pieces(fd, view, off, pieces, npages, landed)
            finally:
                # A helper that never got a CPU has nothing left to do: no wait for it.
                if not helper.cancel():
                    helper.result()
        except OSError as exc:
            raise ProcessLookupError(
                self.pid, f"process {self.pid} pagemap unreadable: {exc}"
            ) from exc


def zero_pfn() -> int:
    """Return the PFN of the kernel's shared zero page, or 0 if PFNs are hidden from us."""
    buf = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        _ = buf[0]  # a read fault on private anon memory maps the zero page
        import ctypes

        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            raw = int.from_bytes(os.pread(fd, 8, (addr >> PAGE_SHIFT) * 8), "little")
        finally:
            os.close(fd)
        del addr
        return raw & int(PM_PFN_MASK) if raw & int(PM_PRESENT) else 0
    finally:
        with contextlib.suppress(BufferError):
            buf.close()
