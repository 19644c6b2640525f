"""Device READ/WRITE through process_vm_readv/writev, checked against the live page table.

Every request names the entries the agent translated with. Before the copy the
daemon refuses with STALE if an INVALIDATE of the range is still pending for
that mirror, or if the live pagemap no longer matches the entries (and then
starts the invalidation the watcher would have). A read is checked again after
the copy, which closes the window in which a page changes mid-copy; its data
is discarded on a mismatch.

The checks run on the event loop; the copy itself runs on the target's worker
(``copier``), since a target can make it block for ever. Each request is
therefore answered through callbacks, ``reply`` or ``fail``, once its copy
finished or its deadline passed; a refusal before the copy is raised at once.
While a copy is in flight the agent holds the ACK of any invalidation of its
pages (SPEC: a DMA in flight is a fence), as a device would.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq
from hmmirror.daemon.dma.buffers import ReadBuffers
from hmmirror.daemon.dma.copier import Copier, CopyJob
from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.linux import vm
from hmmirror.daemon.linux.procfs import PAGE_SHIFT, PM_PFN_MASK, PM_PRESENT, Raw
from hmmirror.daemon.pagetable import vma_perms
from hmmirror.daemon.state import Mm
from hmmirror.daemon.trace import tracer
from hmmirror.daemon.watch.proc import FanOut, detect, merge
from hmmirror.proto.entries import HMM_PFN_PFN_MASK, HMM_PFN_VALID, HMM_PFN_WRITE, Entries
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import MAX_DMA_PAGES, AtomicOp, Event

log = logging.getLogger(__name__)

U64_MASK = (1 << 64) - 1

#: Reads at least this large go out zero-copy (pyzmq's copy=False pays off above ~64 KiB).
ZERO_COPY_MIN = 64 * 1024

#: How a request is failed once its copy is over: the handler turns the error into a reply.
Fail = Callable[[Exception], None]

#: Why a DMA was refused STALE, as a trace records it (``TraceKind.STALE``'s ``arg``).
PENDING, CHANGED, CHANGED_MID_COPY = 0, 1, 2


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
        announcer: FanOut,
        copier: Copier,
    ) -> None:
        self.zero_pfn = zero_pfn
        #: Where a STALE refusal announces the change it found (the fan-out).
        self.announcer = announcer
        self.copier = copier
        #: Per mm: device writes in flight inside a guard, and the guards of those done.
        self._guarded_copies: dict[Mm, int] = {}
        self._guards_done: dict[Mm, list[contextlib.AbstractContextManager[Any]]] = {}
        self.stale = 0
        self.buffers = ReadBuffers(MAX_DMA_PAGES << PAGE_SHIFT)

    def _refuse_stale(self, mm: Mm, start: int, end: int, why: str, reason: int) -> RequestError:
        """Count a STALE refusal (and trace it: ``reason``), start the invalidations the range
        needs; return it."""
        self.stale += 1
        if tracer.on:
            tracer.stale(mm.pid, start, end, reason)
        try:
            changes = detect(mm, self.zero_pfn, start, end)
        except ProcessLookupError:
            changes = []
        if changes:
            self.announcer.announce(mm, changes)
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
                PENDING,
            )
        self._refuse_unless_live(mm, start, npages, entries, "no longer matches")

    def _refuse_unless_live(
        self, mm: Mm, start: int, npages: int, entries: Entries, what: str, reason: int = CHANGED
    ) -> None:
        """Read the live pagemap; refuse (ESRCH, or STALE saying ``what``, traced as
        ``reason``) unless it matches."""
        end = start + (npages << PAGE_SHIFT)
        try:
            live = mm.view.pagemap(start, npages)
        except ProcessLookupError as exc:
            raise RequestError(ErrorCode.ESRCH, f"process {mm.pid} has exited") from exc
        if not matches(entries, live):
            raise self._refuse_stale(
                mm, start, end, f"translation of [{start:#x}, {end:#x}) of pid {mm.pid} {what}",
                reason,
            )  # fmt: skip

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
            self.announcer.announce(mm, changes)
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
        if tracer.on:
            tracer.stale(mm.pid, start, end, CHANGED_MID_COPY)
        return RequestError(
            ErrorCode.STALE,
            f"[{start:#x}, {end:#x}) of pid {mm.pid} changed during the copy ({exc})",
        )

    def _failure(self, mm: Mm, start: int, npages: int, write: bool, job: CopyJob) -> Exception:
        """Why a finished copy failed or fell short: ESRCH, EFAULT, EPERM, STALE, or its own."""
        if mm.closed:  # its view's fds are closed: look at nothing
            return RequestError(ErrorCode.ESRCH, f"process {mm.pid} is no longer mirrored")
        error = job.error
        if isinstance(error, ProcessLookupError):
            return RequestError(ErrorCode.ESRCH, f"process {mm.pid} has exited")
        if isinstance(error, OSError):
            return self._fault_reason(mm, start, npages, write, error)
        if error is not None:
            return error
        return self._fault_reason(mm, start, npages, write, None)

    def _copied(
        self, mm: Mm, start: int, npages: int, write: bool, job: CopyJob, size: int
    ) -> None:
        """Raise ``_failure`` unless the copy moved all ``size`` bytes and the mm is still here."""
        if mm.closed or job.error is not None or job.result != size:
            raise self._failure(mm, start, npages, write, job)

    def _read_whole(
        self, mm: Mm, start: int, npages: int, entries: Entries, job: CopyJob, size: int
    ) -> None:
        """A read's post-copy check: all ``size`` bytes came, and the pages are still the ones
        the entries name (STALE if they changed mid-copy: the data is then discarded)."""
        self._copied(mm, start, npages, False, job, size)
        self._refuse_unless_live(mm, start, npages, entries, "changed mid-copy", CHANGED_MID_COPY)

    def read(
        self,
        mm: Mm,
        start: int,
        npages: int,
        entries: Entries,
        pending: bool,
        reply: Callable[[bytes | zmq.Frame], None],
        fail: Fail,
    ) -> None:
        """Copy ``npages`` from the target, then ``reply(data)`` or ``fail(error)``.

        Raises RequestError (STALE, EINVAL, EBUSY) when it refuses before the copy.
        Small reads come back as bytes; large ones as a zero-copy frame of a pooled buffer.
        """
        self._precheck(mm, start, npages, entries, pending, write=False)
        size = npages << PAGE_SHIFT
        pooled = size >= ZERO_COPY_MIN
        buffers, pid = self.buffers, mm.pid

        def copy(job: CopyJob) -> int:
            # Taken here, not when queued: a queued read holds no memory.
            job.buffer = buf = buffers.take() if pooled else bytearray(size)
            return vm.read_into(pid, memoryview(buf)[:size], [(start, size)])

        def done(job: CopyJob) -> None:
            buf = job.buffer
            if job.cancelled:  # the copy may still write into buf: never hand it out again
                if isinstance(buf, mmap.mmap):
                    buf.madvise(mmap.MADV_DONTNEED)  # what it wrote so far is freed now
                assert job.error is not None
                fail(job.error)
                return
            try:
                self._read_whole(mm, start, npages, entries, job, size)
            except Exception as exc:
                if isinstance(buf, mmap.mmap):
                    buffers.give_back(buf)
                fail(exc)
                return
            if isinstance(buf, mmap.mmap):
                reply(buffers.lend(buf, size))
            else:
                reply(bytes(buf))

        self.copier.submit(mm, copy, done)

    def read_into(
        self,
        mm: Mm,
        start: int,
        npages: int,
        entries: Entries,
        pending: bool,
        into: memoryview,
        reply: Callable[[], None],
        fail: Fail,
    ) -> None:
        """Copy ``npages`` from the target into ``into`` (a window's bytes), then ``reply()``
        or ``fail(error)``: checked as ``read``, before and after the copy.

        A copy answered EBUSY at its deadline may still write ``into`` later: the agent
        must not reuse those bytes (SPEC §4.9). ``into`` keeps the window mapped meanwhile.
        """
        self._precheck(mm, start, npages, entries, pending, write=False)
        size, pid = npages << PAGE_SHIFT, mm.pid

        def copy(job: CopyJob) -> int:
            return vm.read_into(pid, into, [(start, size)])

        def done(job: CopyJob) -> None:
            try:
                if job.cancelled:
                    assert job.error is not None
                    raise job.error
                self._read_whole(mm, start, npages, entries, job, size)
            except Exception as exc:
                fail(exc)
                return
            reply()

        self.copier.submit(mm, copy, done)

    def write(
        self,
        mm: Mm,
        start: int,
        npages: int,
        entries: Entries,
        data: memoryview,
        pending: bool,
        offset: int,
        guard: contextlib.AbstractContextManager[Any],
        reply: Callable[[], None],
        fail: Fail,
    ) -> None:
        """Copy ``data`` to byte ``offset`` of the pages inside ``guard``, then ``reply()``
        or ``fail(error)``; raise RequestError (STALE, EPERM, EBUSY, ...) to refuse at once."""
        self._precheck(mm, start, npages, entries, pending, write=True)
        size = len(data)
        pid, at = mm.pid, start + offset

        def copy(job: CopyJob) -> int:
            return vm.write_from(pid, data, [(at, size)])

        def done(job: CopyJob) -> None:
            try:
                if job.cancelled:
                    assert job.error is not None
                    raise job.error
                self._copied(mm, start, npages, True, job, size)
                self._after_write(mm, start, npages, entries)
            except Exception as exc:
                self._leave(mm, guard)
                fail(exc)
                return
            self._leave(mm, guard)
            reply()

        self._guarded(mm, copy, done, guard, size)

    def _guarded(
        self,
        mm: Mm,
        copy: Callable[[CopyJob], Any],
        done: Callable[[CopyJob], None],
        guard: contextlib.AbstractContextManager[Any],
        nbytes: int = 0,
    ) -> None:
        """Enter ``guard`` and submit the copy; ``done`` leaves it (at once if refused)."""
        guard.__enter__()
        self._guarded_copies[mm] = self._guarded_copies.get(mm, 0) + 1
        try:
            self.copier.submit(mm, copy, done, nbytes)
        except BaseException:
            self._leave(mm, guard)
            raise

    def _leave(self, mm: Mm, guard: contextlib.AbstractContextManager[Any]) -> None:
        """A guarded copy is over: leave its guard once no other one of ``mm`` is in flight.

        Guards of queued writes overlap (each lifted strict protection on entry):
        restoring one write's protection early would make the next write of the
        queue wait for hmmd's own strict-write fault, whose ACK that write fences.
        """
        self._guards_done.setdefault(mm, []).append(guard)
        left = self._guarded_copies[mm] - 1
        if left:
            self._guarded_copies[mm] = left
            return
        del self._guarded_copies[mm]
        for done in self._guards_done.pop(mm):
            try:
                done.__exit__(None, None, None)
            except Exception:  # the request is answered all the same
                log.exception("restoring strict protection of pid %d failed", mm.pid)

    def atomic(
        self,
        mm: Mm,
        addr: int,
        entries: Entries,
        op: AtomicOp,
        operands: tuple[int, int],
        pending: bool,
        guard: contextlib.AbstractContextManager[Any],
        reply: Callable[[int], None],
        fail: Fail,
    ) -> None:
        """Read, compute and write the u64 at ``addr`` inside ``guard``; ``reply(old)``.

        ``operands`` is (compare_add, swap). The whole read-modify-write is one job
        on the target's worker, which runs that target's copies one at a time, so
        atomics on one target through this daemon never interleave
        (``IBV_ATOMIC_HCA``); the target's own CPU accesses are not excluded, as
        with a real HCA. One answered EBUSY before its write started never writes.
        """
        page = addr & ~((1 << PAGE_SHIFT) - 1)
        self._precheck(mm, page, 1, entries, pending, write=True)
        compare_add, swap = operands
        pid = mm.pid

        def copy(job: CopyJob) -> tuple[int, bool] | None:
            cell = bytearray(8)
            if vm.read_into(pid, memoryview(cell), [(addr, 8)]) != 8:
                return None
            old = int.from_bytes(cell, "little")
            if op == AtomicOp.FETCH_ADD:
                new = (old + compare_add) & U64_MASK
            elif old == compare_add:
                new = swap
            else:
                return old, False  # a failed compare-and-swap writes nothing
            if job.cancelled:
                return None  # answered EBUSY meanwhile: the agent was told nothing happened
            if vm.write_from(pid, new.to_bytes(8, "little"), [(addr, 8)]) != 8:
                return None
            return old, True

        def done(job: CopyJob) -> None:
            try:
                if job.cancelled:
                    assert job.error is not None
                    raise job.error
                outcome: tuple[int, bool] | None = job.result
                if mm.closed or job.error is not None or outcome is None:
                    raise self._failure(mm, page, 1, True, job)
                old, wrote = outcome
                if wrote:
                    self._after_write(mm, page, 1, entries)
            except Exception as exc:
                self._leave(mm, guard)
                fail(exc)
                return
            self._leave(mm, guard)
            reply(old)

        self._guarded(mm, copy, done, guard)

    def _after_write(self, mm: Mm, start: int, npages: int, entries: Entries) -> None:
        """Writing may have broken COW (the zero page, a huge zero page, a page shared since
        fork): the new page invalidates old translations, as CLEAR (SPEC §7.2, §8). The
        proc watcher would call a PFN change MIGRATE, but here hmmd's own write replaced the
        page; other events found in the range (UNMAP, PROTECTION_*) keep their names."""
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
            cleared: list[tuple[int, int, Event]] = [
                (lo, hi, Event.CLEAR if event == Event.MIGRATE else event)
                for lo, hi, event in changes
            ]
            self.announcer.announce(mm, merge(cleared))
