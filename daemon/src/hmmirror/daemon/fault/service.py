"""Resolve a FAULT: wait out overlapping invalidations, populate, and read the entries.

The loop mirrors ``hmm_range_fault`` plus the caller's ``-EBUSY`` retry:
an overlapping active invalidation makes the fault wait (``read_begin``), a
populate pass is followed by a fresh look, and the whole thing gives up with
EBUSY after the 1000 ms budget (``HMM_RANGE_DEFAULT_TIMEOUT``). The final read
and the reply happen with no await in between, so an invalidation that starts
later is always sent after the reply.

A fault reads the live page table, so what it hands out is never stale, and
it only replaces the faulting mirror's own shadow for the range. Stale
translations other mirrors may hold are the watcher's and the DMA check's
business; the fault need not look for them.

Faulting in is a copy out of the target, which the target can make block for
ever: it runs on the target's worker (``dma.copier``), in chunks that each get
the copy deadline, and a chunk that misses it ends the fault with EBUSY.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from hmmirror.daemon.dma.copier import Copier, CopyJob
from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.linux import scan, vm
from hmmirror.daemon.linux.procfs import PAGE_SHIFT, PM_PRESENT, Raw
from hmmirror.daemon.pagetable import derive, vma_perms
from hmmirror.daemon.state import Mm
from hmmirror.proto.entries import Entries
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import FaultMode
from hmmirror.proto.version import RETRY_BUDGET

#: Bytes faulted in per copy job: each one must finish within the copy deadline.
POPULATE_CHUNK = 64 << 20


def page_runs(mask: np.ndarray, start: int) -> list[tuple[int, int]]:
    """(address, length) runs of the pages where ``mask`` is true."""
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    return [
        (start + (int(idx[lo]) << PAGE_SHIFT), (int(idx[hi - 1]) - int(idx[lo]) + 1) << PAGE_SHIFT)
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(idx)], strict=True)
    ]


def populate(pid: int, runs: list[tuple[int, int]]) -> int:
    """Fault ``runs`` in by reading them (the data is discarded); return bytes read."""
    total = sum(n for _, n in runs)
    # A bytearray, not an mmap: an exception's traceback may still hold a view of it.
    scratch = bytearray(min(total, 1 << 22))
    done = 0
    batch: list[tuple[int, int]] = []
    room = len(scratch)
    for addr, length in runs:
        while length:
            take = min(length, room)
            batch.append((addr, take))
            addr += take
            length -= take
            room -= take
            if room == 0:
                done += vm.read_into(pid, memoryview(scratch), batch)
                batch, room = [], len(scratch)
    if batch:
        done += vm.read_into(pid, memoryview(scratch), batch)
    return done


def chunks(runs: list[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
    """``runs`` split into consecutive groups of at most ``size`` bytes each."""
    out: list[list[tuple[int, int]]] = [[]]
    room = size
    for addr, length in runs:
        while length:
            if room == 0:
                out.append([])
                room = size
            take = min(length, room)
            out[-1].append((addr, take))
            addr += take
            length -= take
            room -= take
    return out


def _populate_job(pid: int, runs: list[tuple[int, int]]) -> Callable[[CopyJob], int]:
    """The worker's job that faults ``runs`` of ``pid`` in."""

    def job(_: CopyJob) -> int:
        return populate(pid, runs)

    return job


async def fault_in(copier: Copier, mm: Mm, runs: list[tuple[int, int]]) -> int:
    """``populate`` the runs on ``mm``'s worker, chunk by chunk; return bytes read.

    Stops at the first chunk that falls short. Raises RequestError: EBUSY (a chunk
    missed the copy deadline, or the worker is stuck), ESRCH, EFAULT.
    """
    pid = mm.pid
    done = 0
    for chunk in chunks(runs, POPULATE_CHUNK):
        job = await copier.run(mm, _populate_job(pid, chunk))
        error = job.error
        if isinstance(error, ProcessLookupError):
            raise RequestError(ErrorCode.ESRCH, f"process {pid} has exited") from error
        if isinstance(error, OSError):
            raise RequestError(
                ErrorCode.EFAULT, f"cannot fault in pid {pid} at {chunk[0][0]:#x}: {error}"
            ) from error
        if error is not None:
            raise error
        done += job.result
        if job.result < sum(n for _, n in chunk):
            break
    return done


def huge_pages(mm: Mm, start: int, npages: int) -> np.ndarray:
    """Per page: whether it is mapped by a huge (PMD) entry, per PAGEMAP_SCAN."""
    out = np.zeros(npages, dtype=np.bool_)
    for lo, hi in scan.regions(
        mm.view.pagemap_fd, start, start + (npages << PAGE_SHIFT), scan.PAGE_IS_HUGE
    ):
        out[(lo - start) >> PAGE_SHIFT : (hi - start) >> PAGE_SHIFT] = True
    return out


class Pending(NamedTuple):
    """Why a fault cannot be answered yet: an overlapping invalidation, or pages to fault in."""

    busy: bool
    runs: list[tuple[int, int]]


def attempt(
    mm: Mm, start: int, npages: int, write: bool, mode: FaultMode, zero_pfn: int
) -> tuple[Entries, Raw] | Pending:
    """One pass of ``hmm_range_fault`` without waiting: the (entries, raw pagemap), or Pending.

    Raises RequestError: ESRCH (the process is gone), EFAULT (no readable VMA, in
    POPULATE mode), EPERM (a write the VMA forbids).
    """
    end = start + (npages << PAGE_SHIFT)
    if mm.released or mm.closed:
        raise RequestError(ErrorCode.ESRCH, f"process {mm.pid} has exited or is no longer mirrored")
    if mm.busy(start, end):
        return Pending(busy=True, runs=[])  # mmu_interval_read_begin would sleep
    try:
        vmas = mm.view.maps_range(start, end)
    except ProcessLookupError as exc:
        raise RequestError(ErrorCode.ESRCH, f"process {mm.pid} has exited") from exc
    perms = vma_perms(vmas, start, npages)
    readable, writable = perms.readable, perms.writable
    if mode == FaultMode.POPULATE:
        if not readable.all():
            bad = start + (int(np.argmin(readable)) << PAGE_SHIFT)
            raise RequestError(ErrorCode.EFAULT, f"no readable VMA at {bad:#x} in pid {mm.pid}")
        if write and not writable.all():
            bad = start + (int(np.argmin(writable)) << PAGE_SHIFT)
            raise RequestError(ErrorCode.EPERM, f"VMA at {bad:#x} in pid {mm.pid} is not writable")
    # Scratch: the handler copies what it keeps (hand_out) before any await.
    try:
        raw = mm.view.pagemap(start, npages, scratch=True)
    except ProcessLookupError as exc:
        raise RequestError(ErrorCode.ESRCH, f"process {mm.pid} has exited") from exc
    if mode == FaultMode.POPULATE and raw.min() < PM_PRESENT:  # one pass: any page missing?
        return Pending(busy=False, runs=page_runs(raw < PM_PRESENT, start))
    huge = huge_pages(mm, start, npages)
    return derive(raw, perms, zero_pfn, write and mode == FaultMode.POPULATE, huge), raw


async def resolve(
    mm: Mm,
    start: int,
    npages: int,
    write: bool,
    mode: FaultMode,
    zero_pfn: int,
    copier: Copier,
    first: Pending | None = None,
) -> tuple[Entries, Raw]:
    """Return (entries, raw pagemap) for the range, waiting and faulting in as needed.

    ``first`` is the outcome of an ``attempt`` the caller already made; pages are
    faulted in on ``copier``'s worker for ``mm``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RETRY_BUDGET
    end = start + (npages << PAGE_SHIFT)
    step = first if first is not None else attempt(mm, start, npages, write, mode, zero_pfn)
    while isinstance(step, Pending):
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise RequestError(
                ErrorCode.EBUSY,
                f"fault of [{start:#x}, {end:#x}) of pid {mm.pid} kept racing invalidations "
                f"for {RETRY_BUDGET:g} s",
            )
        if step.busy:
            # Sleep until the overlapping window closes (or the budget ends).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(mm.idle.wait(), remaining)
        else:
            got = await fault_in(copier, mm, step.runs)
            if got == 0:
                raise RequestError(
                    ErrorCode.EFAULT, f"cannot fault in pid {mm.pid} at {step.runs[0][0]:#x}"
                )
        step = attempt(mm, start, npages, write, mode, zero_pfn)
    return step
