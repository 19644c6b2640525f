"""/proc readers: process identity, VMAs from maps, and raw pagemap entries.

pagemap bits (Documentation/admin-guide/mm/pagemap.rst): 63 present, 62
swapped, 61 file-page or shared-anon, 57 uffd-wp, 56 exclusively mapped, 55
soft-dirty, 0..54 PFN (visible only with CAP_SYS_ADMIN at open time).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import mmap
import os
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
    """The whole maps line of each VMA: a change in it means the VMA changed."""

    def locate(
        self, addrs: npt.NDArray[np.uint64]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
        """Return, for each address, the index of the VMA covering it and whether one does."""
        idx = np.searchsorted(self.starts, addrs, side="right").astype(np.intp) - 1
        safe = np.maximum(idx, 0)
        covered = (
            (idx >= 0) & (addrs < self.ends[safe])
            if len(self.starts)
            else np.zeros(addrs.shape, dtype=np.bool_)
        )
        return safe, covered


_SPECIAL_NAMES = (b"[vvar]", b"[vsyscall]", b"[vvar_vclock]")


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
        device = name.startswith(b"/dev/") and not name.startswith((b"/dev/zero", b"/dev/shm/"))
        special.append(name in _SPECIAL_NAMES or device)
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


#: Reads of at least this many entries (256 MiB of VA) are split across two threads.
SPLIT_PAGES = 1 << 16
_READER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagemap")


def _read_fully(fd: int, view: memoryview, off: int) -> None:
    """preadv until ``view`` is full; zero what lies past the end of the address space."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], off + done)
        if n <= 0:
            view[done:] = b"\0" * (len(view) - done)
            return
        done += n


class ProcessView:
    """Open handles on one process's maps and pagemap, kept for the process's lifetime.

    The pagemap fd pins the mm that was current at open time, so a reused pid
    can never be read through it.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._scratch: Raw = np.empty(0, dtype=np.uint64)
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

    def replaced(self) -> bool:
        """Whether the mm these handles pin is gone: execve replaced it, or the process died.

        A live mm always has VMAs, so an empty maps read through our (old) descriptor means
        the process now runs in another mm, even though its pid and start time are the same.
        """
        try:
            return len(self.maps().starts) == 0
        except ProcessLookupError:
            return True

    def pagemap(self, start: int, npages: int, *, scratch: bool = False) -> Raw:
        """Read ``npages`` raw pagemap entries from virtual address ``start``.

        With ``scratch`` the result lives in a buffer this view reuses, which
        saves faulting in fresh memory for every large read; the caller must
        be done with it before its next ``scratch`` read (no await in between).
        """
        if scratch:
            if len(self._scratch) < npages:
                self._scratch = np.empty(npages, dtype=np.uint64)
            out = self._scratch[:npages]
        else:
            # np.empty, not zeros: preadv overwrites it all.
            out = np.empty(npages, dtype=np.uint64)
        if npages == 0:
            return out
        view = out.data.cast("B")
        off = (start >> PAGE_SHIFT) * 8
        try:
            if npages >= SPLIT_PAGES:
                # preadv drops the GIL: read the first half on a helper thread meanwhile.
                half = (npages // 2) * 8
                other = _READER.submit(_read_fully, self._pagemap_fd, view[:half], off)
                _read_fully(self._pagemap_fd, view[half:], off + half)
                other.result()
            else:
                _read_fully(self._pagemap_fd, view, off)
        except OSError as exc:
            raise ProcessLookupError(
                self.pid, f"process {self.pid} pagemap unreadable: {exc}"
            ) from exc
        return out


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
