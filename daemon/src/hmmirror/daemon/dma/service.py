"""Device READ/WRITE through process_vm_readv/writev, checked against the live page table.

Every request names the entries the agent translated with. Before the copy the
daemon refuses with STALE if an INVALIDATE of the range is still pending for
that mirror, or if the live pagemap no longer matches the entries (and then
starts the invalidation the watcher would have). A read is checked again after
the copy, which closes the window in which a page changes mid-copy; its data
is discarded on a mismatch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import zmq
from hmmirror.daemon.dma.buffers import ReadBuffers
from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.linux import vm
from hmmirror.daemon.linux.procfs import PAGE_SHIFT, PM_PFN_MASK, PM_PRESENT, Raw
from hmmirror.daemon.mm import Mm
from hmmirror.daemon.pagetable import vma_perms
from hmmirror.daemon.watch.proc import Change, detect
from hmmirror.proto.entries import HMM_PFN_PFN_MASK, HMM_PFN_VALID, HMM_PFN_WRITE, Entries
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import MAX_DMA_PAGES, AtomicOp

U64_MASK = (1 << 64) - 1

#: Reads at least this large go out zero-copy (pyzmq's copy=False pays off above ~64 KiB).
ZERO_COPY_MIN = 64 * 1024


def matches(entries: Entries, raw: Raw) -> bool:
    """Whether every entry still names the page the live pagemap shows."""
    present = (raw & PM_PRESENT) != 0
    same = (raw & PM_PFN_MASK) == (entries & np.uint64(HMM_PFN_PFN_MASK))
    return bool((present & same).all())


class DmaService:
    """Performs checked device accesses on one daemon's mms."""

    def __init__(
        self,
        zero_pfn: int,
        start_invalidations: Callable[[Mm, list[Change]], None],
    ) -> None:
        self.zero_pfn = zero_pfn
        self.start_invalidations = start_invalidations
        self.stale = 0
        self.buffers = ReadBuffers(MAX_DMA_PAGES << PAGE_SHIFT)

    def _refuse_stale(self, mm: Mm, start: int, end: int, why: str) -> RequestError:
        """Count a STALE refusal, start the invalidations the range needs; return it."""
        self.stale += 1
        try:
            changes = detect(mm, self.zero_pfn, start, end)
        except ProcessLookupError:
            changes = []
        if changes:
            self.start_invalidations(mm, changes)
        return RequestError(ErrorCode.STALE, why)

    def _precheck(
        self, mm: Mm, start: int, npages: int, entries: Entries, pending: bool, write: bool
    ) -> None:
        """Refuse a DMA before copying: entries not VALID (or WRITE), pending or stale."""
        end = start + (npages << PAGE_SHIFT)
        if not ((entries & np.uint64(HMM_PFN_VALID)) != 0).all():
            raise RequestError(
                ErrorCode.EINVAL, f"DMA at {start:#x} names an entry that is not VALID"
            )
        if write and not ((entries & np.uint64(HMM_PFN_WRITE)) != 0).all():
            raise RequestError(
                ErrorCode.EPERM, f"DMA write at {start:#x} names an entry without WRITE"
            )
        if pending:
            raise self._refuse_stale(
                mm,
                start,
                end,
                f"an INVALIDATE of [{start:#x}, {end:#x}) is pending for this mirror",
            )
        self._refuse_unless_live(mm, start, npages, entries, "no longer matches")

    def _refuse_unless_live(
        self, mm: Mm, start: int, npages: int, entries: Entries, what: str
    ) -> None:
        """Read the live pagemap; refuse (ESRCH, or STALE saying ``what``) unless it matches."""
        end = start + (npages << PAGE_SHIFT)
        try:
            live = mm.view.pagemap(start, npages)
        except ProcessLookupError as exc:
            raise RequestError(ErrorCode.ESRCH, f"process {mm.pid} has exited") from exc
        if not matches(entries, live):
            raise self._refuse_stale(
                mm, start, end, f"translation of [{start:#x}, {end:#x}) of pid {mm.pid} {what}"
            )

    def _fault_reason(
        self, mm: Mm, start: int, npages: int, write: bool, exc: OSError | None
    ) -> RequestError:
        """Why a copy failed or fell short: ESRCH, EFAULT, EPERM, else STALE."""
        end = start + (npages << PAGE_SHIFT)
        try:
            vmas = mm.view.maps_range(start, end)
        except ProcessLookupError:
            return RequestError(ErrorCode.ESRCH, f"process {mm.pid} has exited")
        perms = vma_perms(vmas, start, npages)
        readable, writable = perms.readable, perms.writable
        try:
            changes = detect(mm, self.zero_pfn, start, end, vmas)
        except ProcessLookupError:
            return RequestError(ErrorCode.ESRCH, f"process {mm.pid} has exited")
        if changes:
            self.start_invalidations(mm, changes)
        if not readable.all():
            return RequestError(
                ErrorCode.EFAULT, f"no readable VMA in [{start:#x}, {end:#x}) of pid {mm.pid}"
            )
        if write and not writable.all():
            # process_vm_writev says EFAULT for a read-only page; dmirror says EPERM.
            return RequestError(
                ErrorCode.EPERM, f"[{start:#x}, {end:#x}) of pid {mm.pid} is read-only"
            )
        self.stale += 1
        return RequestError(
            ErrorCode.STALE,
            f"[{start:#x}, {end:#x}) of pid {mm.pid} changed during the copy ({exc})",
        )

    def read(
        self, mm: Mm, start: int, npages: int, entries: Entries, pending: bool
    ) -> bytes | zmq.Frame:
        """Copy ``npages`` from the target; raise RequestError (STALE, EFAULT, EINVAL).

        Small reads come back as bytes; large ones as a zero-copy frame of a pooled buffer.
        """
        self._precheck(mm, start, npages, entries, pending, write=False)
        size = npages << PAGE_SHIFT
        if size < ZERO_COPY_MIN:
            small = bytearray(size)
            self._copy_out(mm, start, npages, memoryview(small), entries)
            return bytes(small)
        buf = self.buffers.take()
        try:
            self._copy_out(mm, start, npages, memoryview(buf)[:size], entries)
        except BaseException:
            self.buffers.give_back(buf)
            raise
        return self.buffers.lend(buf, size)

    def read_or_none(
        self, mm: Mm, start: int, npages: int, entries: Entries
    ) -> bytes | zmq.Frame | None:
        """``read`` through entries just handed out, or None where it refuses (STALE, EFAULT)."""
        try:
            return self.read(mm, start, npages, entries, pending=False)
        except RequestError:
            return None

    def _copy_out(
        self, mm: Mm, start: int, npages: int, into: memoryview, entries: Entries
    ) -> None:
        """process_vm_readv the pages into ``into``, then check the translation held."""
        size = len(into)
        try:
            got = vm.read_into(mm.pid, into, [(start, size)])
        except OSError as exc:
            raise self._fault_reason(mm, start, npages, False, exc) from exc
        if got != size:
            raise self._fault_reason(mm, start, npages, False, None)
        self._refuse_unless_live(mm, start, npages, entries, "changed mid-copy")

    def write(
        self,
        mm: Mm,
        start: int,
        npages: int,
        entries: Entries,
        data: memoryview,
        pending: bool,
        offset: int = 0,
    ) -> None:
        """Copy ``data`` to byte ``offset`` of the pages; raise RequestError (STALE, EPERM, ...)."""
        self._precheck(mm, start, npages, entries, pending, write=True)
        size = len(data)
        try:
            got = vm.write_from(mm.pid, data, [(start + offset, size)])
        except OSError as exc:
            raise self._fault_reason(mm, start, npages, True, exc) from exc
        if got != size:
            raise self._fault_reason(mm, start, npages, True, None)
        self._after_write(mm, start, npages, entries)

    def atomic(
        self,
        mm: Mm,
        addr: int,
        entries: Entries,
        op: AtomicOp,
        compare_add: int,
        swap: int,
        pending: bool,
    ) -> int:
        """Read, compute and write the u64 at ``addr``; return the old value.

        No await and no other request runs in between, so atomics through this
        daemon never interleave (``IBV_ATOMIC_HCA``); the target's own CPU
        accesses are not excluded, as with a real HCA.
        """
        page = addr & ~((1 << PAGE_SHIFT) - 1)
        self._precheck(mm, page, 1, entries, pending, write=True)
        cell = bytearray(8)
        try:
            got = vm.read_into(mm.pid, memoryview(cell), [(addr, 8)])
        except OSError as exc:
            raise self._fault_reason(mm, page, 1, True, exc) from exc
        if got != 8:
            raise self._fault_reason(mm, page, 1, True, None)
        old = int.from_bytes(cell, "little")
        if op == AtomicOp.FETCH_ADD:
            new = (old + compare_add) & U64_MASK
        elif old == compare_add:
            new = swap
        else:
            return old  # a failed compare-and-swap writes nothing
        try:
            got = vm.write_from(mm.pid, new.to_bytes(8, "little"), [(addr, 8)])
        except OSError as exc:
            raise self._fault_reason(mm, page, 1, True, exc) from exc
        if got != 8:
            raise self._fault_reason(mm, page, 1, True, None)
        self._after_write(mm, page, 1, entries)
        return old

    def _after_write(self, mm: Mm, start: int, npages: int, entries: Entries) -> None:
        """Writing may have broken COW (zero page, fork): a new PFN invalidates old translations."""
        try:
            post = mm.view.pagemap(start, npages)
            changes = (
                []
                if matches(entries, post)
                else detect(mm, self.zero_pfn, start, start + (npages << PAGE_SHIFT))
            )
        except ProcessLookupError:
            return  # the target exited after the copy: its RELEASE follows
        if changes:
            self.start_invalidations(mm, changes)
