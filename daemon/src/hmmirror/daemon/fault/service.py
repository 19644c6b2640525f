"""Resolve a FAULT: wait out overlapping invalidations, populate, and read the entries.

The loop mirrors ``hmm_range_fault`` plus the caller's ``-EBUSY`` retry:
an overlapping active invalidation makes the fault wait (``read_begin``), a
populate pass is followed by a fresh look, and the whole thing gives up with
EBUSY after the 1000 ms budget (``HMM_RANGE_DEFAULT_TIMEOUT``). A write fault
breaks copy-on-write first, as ``hmm_range_fault`` does: it hands out WRITE only
on pages the target maps exclusively, and any other page of a private VMA (not
present, the zero page, one still shared with a fork child, a file's page
cache) is populated by the target's own write fault, ``madvise(MADV_POPULATE_WRITE)``
injected with ptrace (``linux.inject``). The final read
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
import os
import signal
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from hmmirror.daemon.dma.copier import Copier, CopyJob
from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.frames import FrameTokens
from hmmirror.daemon.linux import inject, injector, scan, vm
from hmmirror.daemon.linux.procfs import PAGE_SHIFT, PM_PFN_MASK, PM_PRESENT, Raw, Vmas
from hmmirror.daemon.pagetable import (
    classify,
    derive_into,
    first_lacking,
    mark_huge,
    runs,
    vma_perms,
    vma_stretches,
)
from hmmirror.daemon.state import Mm, Span
from hmmirror.proto.entries import HMM_PFN_VALID, HMM_PFN_WRITE, PMD_ORDER, Entries
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import Event, FaultMode
from hmmirror.proto.version import RETRY_BUDGET

#: Bytes faulted in per copy job: each one must finish within the copy deadline.
POPULATE_CHUNK = 64 << 20
#: The least entry with both VALID (bit 63) and WRITE (bit 62): one compare tests both.
_VALID_WRITE = np.uint64(HMM_PFN_VALID | HMM_PFN_WRITE)


def index_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) runs of the indices where ``mask`` is true."""
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    return [
        (int(idx[lo]), int(idx[hi - 1]) + 1)
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(idx)], strict=True)
    ]


def page_runs(mask: np.ndarray, start: int) -> list[tuple[int, int]]:
    """(address, length) runs of the pages where ``mask`` is true."""
    return [(start + (lo << PAGE_SHIFT), (hi - lo) << PAGE_SHIFT) for lo, hi in index_runs(mask)]


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


def _populate_write_job(mm: Mm, runs: list[tuple[int, int]]) -> Callable[[CopyJob], None]:
    """The worker's job that write-faults ``runs`` of ``mm`` in, in the target itself (by
    the injector process, which undoes the injection even if hmmd dies meanwhile)."""

    own = _own_userfaultfds(mm)

    def job(running: CopyJob) -> None:
        injector.populate_write(mm.pid, running.pidfd, runs, own)

    return job


def _own_userfaultfds(mm: Mm) -> list[int]:
    """The inodes of hmmd's userfaultfds of ``mm``: the target may hold one too (it left it
    open for hmmd to take), and the injector must not take it for one the target serves."""
    inodes = []
    for watch in (mm.uffd, mm.strict_uffd):
        if watch is not None and not watch.closed:
            with contextlib.suppress(OSError):
                inodes.append(os.fstat(watch.fd).st_ino)
    return inodes


def _alive(mm: Mm) -> bool:
    """Whether ``mm``'s process still runs (its pidfd says so, whatever became of its pid)."""
    try:
        signal.pidfd_send_signal(mm.pidfd, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # not ours to signal, say: it exists
    return True


async def fault_in_write(
    copier: Copier, mm: Mm, runs: list[tuple[int, int]]
) -> RequestError | None:
    """Write-fault the runs in the target (``injector.populate_write``), chunk by chunk, on
    ``mm``'s worker: afterwards each page is the target's own, COW broken.

    Where the target cannot be made to (already traced, under seccomp, never stopped) the
    fault is refused EFAULT, as ``hmm_range_fault`` refuses a write it cannot make: handing
    out read-only entries instead would leave the agent faulting for WRITE until its
    budget ends, and WRITE on a shared page would let the device write the fork child's
    (or the zero page's) memory. Raises RequestError: EFAULT, ESRCH, EBUSY. A madvise
    that ran and failed (the target unmapped or protected the range meanwhile) is
    returned, not raised: a fresh walk says what the fault gets (``resolve``).
    """
    pid = mm.pid
    for chunk in chunks(runs, POPULATE_CHUNK):
        job = await copier.run(mm, _populate_write_job(mm, chunk))
        error = job.error
        if isinstance(error, ProcessLookupError):
            raise RequestError(ErrorCode.ESRCH, f"process {pid} has exited") from error
        if isinstance(error, inject.InjectError) and not _alive(mm):
            raise RequestError(ErrorCode.ESRCH, f"process {pid} has exited") from error
        if isinstance(error, inject.InjectError):
            failure = RequestError(
                ErrorCode.EFAULT,
                f"write fault at {chunk[0][0]:#x} in pid {pid} cannot break copy-on-write: {error}",
            )
            failure.__cause__ = error
            if isinstance(error, inject.CallFailed):
                return failure
            raise failure
        if error is not None:
            raise error
    return None


#: Pages per PMD: a huge mapping covers this many, from a PMD-aligned address.
_PMD_PAGES = 1 << PMD_ORDER


def huge_regions(mm: Mm, start: int, raw: Raw) -> list[tuple[int, int]]:
    """The [lo, hi) page runs of the range mapped by a huge (PMD) entry, per PAGEMAP_SCAN.

    Only where one can be: a PMD maps a naturally aligned 2 MiB frame at a 2 MiB
    aligned address, so each of its pages has ``pfn % 512 == vpn % 512``
    (fs/proc/task_mmu.c reports ``pmd_pfn + index``, hugetlb alike). The first
    page in range of each 2 MiB block is tested in ``raw``; only blocks whose
    first page is present and aligned so are asked about, which for a range of
    4 KiB pages is a block or two in a thousand (none when nothing is huge).
    Where PFNs are hidden (PFN 0, never a user page) every present block is asked about.
    """
    npages = len(raw)
    if npages == 0:
        return []
    vpn = start >> PAGE_SHIFT
    # Indices of each 2 MiB block's first page in the range.
    firsts = np.arange((-vpn) % _PMD_PAGES, npages, _PMD_PAGES, dtype=np.int64)
    if len(firsts) == 0 or firsts[0] != 0:
        firsts = np.concatenate(([0], firsts))
    sample = raw[firsts]
    pfn = sample & PM_PFN_MASK
    offset = pfn - (np.uint64(vpn) + firsts.astype(np.uint64))  # modulo 2**64: fine modulo 512
    aligned = (offset & np.uint64(_PMD_PAGES - 1)) == 0
    candidate = (sample >= PM_PRESENT) & (aligned | (pfn == 0))
    if not candidate.any():
        return []
    ends = np.concatenate((firsts[1:], [npages]))
    out: list[tuple[int, int]] = []
    # Neighbouring candidate blocks are asked about in one ioctl.
    for a, b in index_runs(candidate):
        lo, hi = int(firsts[a]), int(ends[b - 1])
        for r_lo, r_hi in scan.regions(
            mm.view.pagemap_fd,
            start + (lo << PAGE_SHIFT),
            start + (hi << PAGE_SHIFT),
            scan.PAGE_IS_HUGE,
        ):
            out.append(((r_lo - start) >> PAGE_SHIFT, (r_hi - start) >> PAGE_SHIFT))
    return out


class Pending(NamedTuple):
    """Why a fault cannot be answered yet: an overlapping invalidation, or pages to fault in
    (``write``: by a write fault in the target, which breaks copy-on-write)."""

    busy: bool
    runs: list[tuple[int, int]]
    write: bool = False


class Walked(NamedTuple):
    """A fault's walk of the range, three arrays of one u64 per page, all the caller's."""

    entries: Entries
    """The entries for the wire: frame tokens in place of PFNs if the walk was given tokens."""
    shadow: Entries
    """The same entries with their PFNs: what the mirror's shadow records (``Span.hand_out``)."""
    raw: Raw
    """The raw pagemap entries they came from."""
    vmas: Vmas
    """The VMAs over the range when it was walked."""


class WalkOptions(NamedTuple):
    """What a walk does beyond ``hmm_range_fault``: for whom the entries are made."""

    may_write: bool = True
    """False: no entry gets WRITE (a mirror registered without WRITE access)."""
    tokens: FrameTokens | None = None
    """Frame tokens to put in the wire entries in place of PFNs, as the walk goes."""


#: A walk for a mirror with WRITE access and physical frames.
PLAIN = WalkOptions()


def attempt(
    mm: Mm,
    start: int,
    npages: int,
    write: bool,
    mode: FaultMode,
    zero_pfn: int,
    options: WalkOptions = PLAIN,
) -> Walked | Pending:
    """One pass of ``hmm_range_fault`` without waiting: the walk of the range, or Pending.

    The pagemap is read in pieces, and each piece is walked as soon as it is in
    (``ProcessView.pagemap_into``), while it is still in cache: its entries made,
    copied for the shadow, and tokenized for the wire, with no array the size of
    the range but the three the caller keeps. Raises RequestError: ESRCH (the
    process is gone), EFAULT (no readable VMA, in POPULATE mode), EPERM (a write
    the VMA forbids).
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
    stretches = vma_stretches(vmas, start, npages)
    populate = mode == FaultMode.POPULATE
    if populate:
        bad_page = first_lacking(stretches, False)
        if bad_page is not None:
            bad = start + (bad_page << PAGE_SHIFT)
            raise RequestError(ErrorCode.EFAULT, f"no readable VMA at {bad:#x} in pid {mm.pid}")
        bad_page = first_lacking(stretches, True) if write else None
        if bad_page is not None:
            bad = start + (bad_page << PAGE_SHIFT)
            raise RequestError(ErrorCode.EPERM, f"VMA at {bad:#x} in pid {mm.pid} is not writable")
    raw = np.empty(npages, dtype=np.uint64)
    shadow = np.empty(npages, dtype=np.uint64)
    entries = np.empty(npages, dtype=np.uint64)
    write_fault = write and populate and options.may_write
    missing: list[int] = []  # pieces with a page to populate (appended from two threads)

    def walk(lo: int, hi: int) -> None:
        if populate and not write_fault and raw[lo:hi].min() < PM_PRESENT:
            missing.append(lo)
            return  # a populate pass comes first: nothing to make yet
        derive_into(shadow, raw, stretches, zero_pfn, write_fault, lo, hi, options.may_write)
        if write_fault and shadow[lo:hi].min() < _VALID_WRITE:
            missing.append(lo)  # every page is writable (else EPERM): one lacks its COW break
            return
        # Two arrays, made while the piece is in cache: the shadow keeps one (Span.hand_out),
        # the wire gets the other, which nobody changes while libzmq sends it.
        np.copyto(entries[lo:hi], shadow[lo:hi])
        if options.tokens is not None:
            options.tokens.tokenize(entries[lo:hi])

    try:
        mm.view.pagemap_into(raw, start, walk, shared=True)
    except ProcessLookupError as exc:
        raise RequestError(ErrorCode.ESRCH, f"process {mm.pid} has exited") from exc
    if missing and write_fault:
        return Pending(busy=False, runs=page_runs(shadow < _VALID_WRITE, start), write=True)
    if missing:
        return Pending(busy=False, runs=page_runs(raw < PM_PRESENT, start))
    huge = huge_regions(mm, start, raw)
    mark_huge(shadow, huge)
    mark_huge(entries, huge)  # the order bits lie above the 32 that tokens change
    return Walked(entries, shadow, raw, vmas)


async def resolve(
    mm: Mm,
    start: int,
    npages: int,
    write: bool,
    mode: FaultMode,
    zero_pfn: int,
    copier: Copier,
    first: Pending | None = None,
    options: WalkOptions = PLAIN,
) -> Walked:
    """Return the walk of the range (``attempt``), waiting and faulting in as needed.

    ``first`` is the outcome of an ``attempt`` the caller already made; pages are
    faulted in on ``copier``'s worker for ``mm``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RETRY_BUDGET
    end = start + (npages << PAGE_SHIFT)
    step: Walked | Pending = (
        attempt(mm, start, npages, write, mode, zero_pfn, options) if first is None else first
    )
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
                async with asyncio.timeout(remaining):
                    await mm.idle.wait()
        elif step.write:
            failed = await fault_in_write(copier, mm, step.runs)
            if failed is not None:
                step = attempt(mm, start, npages, write, mode, zero_pfn, options)
                if isinstance(step, Pending) and step.write:
                    raise failed  # not the range changing under it: the call cannot succeed
                continue
        else:
            got = await fault_in(copier, mm, step.runs)
            if got == 0:
                raise RequestError(
                    ErrorCode.EFAULT, f"cannot fault in pid {mm.pid} at {step.runs[0][0]:#x}"
                )
        step = attempt(mm, start, npages, write, mode, zero_pfn, options)
    return step


def changed_under(
    span: Span, start: int, walked: Walked, zero_pfn: int
) -> list[tuple[int, int, Event]]:
    """What the walk finds changed under entries the mirror already holds in its range, by
    the watcher's own rules (``pagetable.classify``): changes to invalidate before the walk
    is handed out over them, since the hand-out replaces the record that a poll would
    judge them by, while the agent may yet install the older entries last (``Span.hand_out``).
    """
    a = (start - span.start) >> PAGE_SHIFT
    n = len(walked.raw)
    handed = span.handed[a : a + n]
    if not handed.any():
        return []
    perms = vma_perms(walked.vmas, start, n)
    return runs(classify(handed, span.raw[a : a + n], walked.raw, perms, zero_pfn), start)
