"""A mirror: the device page table of one interval of a target, and the device operations on it.

The fault loop is the kernel's (Documentation/mm/hmm.rst)::

    again: gen = read_begin()            # this mirror's invalidation count
           entries = await FAULT(range)  # hmm_range_fault in hmmd
           if read_retry(gen): goto again  # an INVALIDATE arrived meanwhile
           install(entries)              # no await between check and install

Everything runs on one event loop, so code between two awaits is the
"user_lock" critical section: an INVALIDATE handled by the drain loop can never
interleave with the check-and-install. Device reads and writes go through
hmmd (process_vm_readv/writev), naming the entries they translated with; each
in-flight DMA is a fence that holds the ACK of an invalidation overlapping it.
The table itself, and what an INVALIDATE does to it, is ``MirrorTable`` (``_table.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn, Protocol

import numpy as np
import numpy.typing as npt
from hmmirror.client._reads import ReadCoalescer
from hmmirror.client._table import VALID, MirrorTable
from hmmirror.client.channel import R
from hmmirror.client.errors import DeviceError, MirrorEvicted, RemoteError, device_error
from hmmirror.client.window import WINDOW_MIN, DmaWindow, Slot
from hmmirror.proto.entries import (
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    PAGE_SHIFT,
    PAGE_SIZE,
    Entries,
    from_wire,
    prot_bytes,
    to_wire,
)
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import (
    Access,
    AtomicOp,
    AtomicReply,
    DmaAtomic,
    DmaRead,
    DmaReadInto,
    DmaReadReply,
    DmaWrite,
    DmaWriteFrom,
    Fault,
    FaultMode,
    FaultReadReply,
    FaultReply,
    Message,
    Ok,
    Registered,
    Unregister,
)
from hmmirror.proto.version import RETRY_BUDGET


class MirrorHost(Protocol):
    """What a mirror needs of the session it belongs to (``Session`` is one): the session
    module builds mirrors, so this module names it only through this interface."""

    timeout: float
    mirrors: dict[int, Mirror]

    @property
    def zero_pfn(self) -> int: ...

    @property
    def max_dma_pages(self) -> int: ...

    @property
    def max_fault_pages(self) -> int: ...

    @property
    def physical_frames(self) -> bool: ...

    @property
    def dma_window(self) -> DmaWindow | None: ...

    async def exchange(
        self,
        msg: Message,
        expect: type[R] | tuple[type[R], ...],
        bulk: Sequence[Any] = (),
        *,
        timeout: float | None = None,
        copy: bool = True,
    ) -> tuple[R, tuple[memoryview, ...]]:
        """Send ``msg`` and await its reply, of type ``expect``, and the reply's bulk."""
        ...

    def dma_done(self) -> None:
        """A DMA finished: acks held behind it may go out."""


_VALID_WRITE = np.uint64(HMM_PFN_VALID | HMM_PFN_WRITE)
_PAGE_MASK = PAGE_SIZE - 1


class Faulted(NamedTuple):
    """What a device fault did: the pages it installed, and their data when the fault
    read them in the same trip (None otherwise), which then serves a read access."""

    installed: int
    data: memoryview | None = None


#: Faults the pages [addr, +npages) in, however the caller's device model wants it.
FaultFn = Callable[[int, int], Awaitable[Faulted]]


@dataclass(frozen=True)
class ReadResult:
    """What HMM_DMIRROR_READ returns: the bytes, pages copied, and fault calls made."""

    data: bytes
    cpages: int
    faults: int


@dataclass(frozen=True)
class WriteResult:
    """What HMM_DMIRROR_WRITE returns: pages copied and fault calls made."""

    cpages: int
    faults: int


class _Stale(Exception):
    """hmmd refused a DMA as STALE: fault again."""


def _in_slot(pieces: list[memoryview], slot: Slot) -> bool:
    """Whether the data read is the slot's (not the data a fault brought in its own trip)."""
    return len(pieces) == 1 and pieces[0].obj is slot.window.map


class Mirror(MirrorTable):
    """One agent's mirror of [start, end) of a target, with its device page table."""

    def __init__(
        self, session: MirrorHost, reg: Registered, start: int, length: int, access: Access
    ) -> None:
        super().__init__(reg.mirror, reg.pid, start, length, access)
        self.session = session
        self.start_time = reg.start_time
        self.seq = reg.seq
        #: Fault replies thrown away because an invalidation raced them (read_retry).
        self.retries = 0
        #: Testing hook: awaited between a FAULT reply and the read_retry check.
        self.fault_hook: Callable[[], Awaitable[None]] | None = None
        #: Testing hook: awaited while a DMA is still in flight, after hmmd answered it (a
        #: device still moving the data): an overlapping invalidation's ACK must wait.
        self.dma_hook: Callable[[], Awaitable[None]] | None = None

    # --- requests -------------------------------------------------------------------------------

    async def _call(
        self,
        msg: Message,
        expect: type[R] | tuple[type[R], ...],
        bulk: Sequence[Any] = (),
        copy: bool = True,
    ) -> tuple[R, tuple[memoryview, ...]]:
        """A session request, hmmd's refusals turned into _Stale, MirrorEvicted or DeviceError.

        A read or fault refused at once with EAGAIN is asked again for up to the
        session's request timeout: hmmd refuses them while its unread replies to
        this session fill the connection's reply cap, which reading them frees (an
        agent that pipelines more large reads than the cap holds meets this). This
        is flow control, not a race with invalidations, so it gets the request's
        deadline rather than the fault retry budget.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.session.timeout
        pause = 0.001
        while True:
            try:
                return await self.session.exchange(msg, expect, bulk, copy=copy)
            except RemoteError as exc:
                if not (
                    exc.code == ErrorCode.EAGAIN
                    and isinstance(msg, Fault | DmaRead | DmaReadInto)  # nothing done: ask again
                    and loop.time() + pause < deadline
                ):
                    self._refused(exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _refused(self, exc: RemoteError) -> NoReturn:
        """Raise hmmd's refusal as _Stale, MirrorEvicted or DeviceError."""
        if exc.code == ErrorCode.STALE:
            raise _Stale(exc.message) from exc
        if exc.code in (ErrorCode.NO_MIRROR, ErrorCode.FENCED, ErrorCode.NO_SESSION):
            self._check_live()
            raise MirrorEvicted(f"mirror {self.id}: {exc.message}") from exc
        raise device_error(exc) from exc

    # --- the fault loop ---------------------------------------------------------------------

    async def _fault_range(
        self, addr: int, npages: int, write: bool, mode: FaultMode, read: bool = False
    ) -> tuple[Entries, memoryview | None]:
        """read_begin → FAULT → read_retry, retried for up to 1000 ms.

        Returns the entries, and with ``read`` the pages' data when hmmd could read
        them in the same trip (None otherwise).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_BUDGET
        msg = Fault(
            mirror=self.id, start=addr, npages=npages, write=write, mode=int(mode), read=read
        )
        while True:
            self._check_live()
            gen = self._gen  # mmu_interval_read_begin
            _, bulk = await self._call(msg, (FaultReply, FaultReadReply))
            entries = from_wire(bulk[0], npages)
            if self.fault_hook is not None:
                await self.fault_hook()
            if self._gen == gen:  # not mmu_interval_read_retry: install with no await in between
                return entries, bulk[1] if len(bulk) > 1 else None
            self.retries += 1
            # hmmd recorded the discarded reply as what this mirror holds for the range,
            # and judges later changes against it: an older entry kept here could go
            # stale with no INVALIDATE ever naming it. Hold nothing there instead.
            self._zap_slots(addr, npages)
            if loop.time() > deadline:
                raise DeviceError(errno.EBUSY, f"fault at {addr:#x} kept racing invalidations")

    async def populate(
        self,
        addr: int,
        npages: int,
        write: bool,
        mode: FaultMode = FaultMode.POPULATE,
        downgrade: bool = False,
    ) -> int:
        """Fault [addr, +npages) into the table and return the pages installed; count nothing.

        ``mode`` PRESENT maps only what is already present. ``downgrade`` installs
        the entries without their WRITE bit (mlx5's ``MLX5_PF_FLAGS_DOWNGRADE``).
        """
        a, _ = self._range(addr, npages)
        if write and not self.access & Access.WRITE:
            raise DeviceError(errno.EPERM, f"mirror {self.id} has no WRITE access")
        installed = 0
        chunk = self.session.max_fault_pages
        for off in range(0, npages, chunk):
            n = min(chunk, npages - off)
            entries, _ = await self._fault_range(addr + (off << PAGE_SHIFT), n, write, mode)
            installed += self._install(a + off, entries, downgrade)
        return installed

    async def populate_read(self, addr: int, npages: int, write: bool) -> Faulted:
        """``populate`` of at most ``max_dma_pages`` that also reads the pages in the same trip.

        Returns the pages installed and their data (None if hmmd could not read
        them then: the caller reads as usual).
        """
        a, _ = self._range(addr, npages)
        if write and not self.access & Access.WRITE:
            raise DeviceError(errno.EPERM, f"mirror {self.id} has no WRITE access")
        read = npages <= self.session.max_dma_pages
        entries, data = await self._fault_range(addr, npages, write, FaultMode.POPULATE, read)
        return Faulted(self._install(a, entries, False), data)

    async def fault(self, addr: int, npages: int, write: bool = False) -> int:
        """Fault [addr, +npages) into the table (one fault event); return the pages installed."""
        installed = await self.populate(addr, npages, write)
        self._counters["page_faults"] += installed
        self._counters["page_faults_handled"] += 1
        return installed

    async def snapshot(self, addr: int, npages: int) -> npt.NDArray[np.uint8]:
        """HMM_DMIRROR_SNAPSHOT: one dmirror PROT byte per page, faulting nothing in."""
        self._range(addr, npages)
        out = []
        chunk = self.session.max_fault_pages
        for off in range(0, npages, chunk):
            n = min(chunk, npages - off)
            entries, _ = await self._fault_range(
                addr + (off << PAGE_SHIFT), n, False, FaultMode.SNAPSHOT
            )
            out.append(prot_bytes(entries, self.session.zero_pfn))
        return np.concatenate(out)

    # --- device accesses ----------------------------------------------------------------------

    @functools.cached_property
    def _reads(self) -> ReadCoalescer:
        """This mirror's read coalescer, made on first use."""

        def entries(lo: int, hi: int) -> Entries:
            a = (lo - self.start) >> PAGE_SHIFT
            return self.table[a : a + ((hi - lo) >> PAGE_SHIFT)].copy()

        return ReadCoalescer(entries, self._read_run, lambda: self.session.max_dma_pages)

    def read_now(self, addr: int, length: int) -> asyncio.Future[memoryview | None] | None:
        """A small device read served without a task of its own: when every page of
        [addr, addr + length) holds a VALID translation now, it joins this turn's coalesced
        ``dma_read`` (as a run of its own if it has no company), and the future gives its
        data, or None if that run was refused or failed (a STALE, an eviction: the caller
        then takes ``transfer``, which faults, retries and raises as it must). None at once
        when the read cannot go this way: the mirror is not live, a page is missing, or the
        read is one for the DMA window (SPEC §4.9) or larger than one ``dma_read``."""
        if self.released or self.dropped is not None or length <= 0:
            return None
        if self.session.dma_window is not None and length >= WINDOW_MIN:
            return None
        first = addr & ~_PAGE_MASK
        end = addr + length
        if first < self.start or end > self.end:
            return None
        a = (first - self.start) >> PAGE_SHIFT
        b = (end - self.start + _PAGE_MASK) >> PAGE_SHIFT
        if b - a > self.session.max_dma_pages:
            return None
        table = self.table
        if b - a <= 2:  # a small read's pages, looked at one by one: cheaper than an array op
            if table[a] < VALID or table[b - 1] < VALID:
                return None
        elif not bool((table[a:b] >= VALID).all()):
            return None
        return self._reads.read(addr, length, alone=True)

    async def _read_run(self, start: int, entries: Entries) -> memoryview:
        """One plain ``dma_read`` of len(entries) pages from ``start``; the data."""
        npages = len(entries)
        read = DmaRead(mirror=self.id, start=start, npages=npages)
        _, got = await self._dma(read, DmaReadReply, start, npages, entries, None)
        return got[0]

    async def _dma(
        self,
        msg: DmaRead | DmaWrite | DmaAtomic | DmaReadInto | DmaWriteFrom,
        expect: type[R],
        start: int,
        npages: int,
        entries: Entries,
        data: memoryview | None,
    ) -> tuple[R, tuple[memoryview, ...]]:
        """Send a DMA request as an in-flight fence that overlapping ACKs wait for."""
        end = start + (npages << PAGE_SHIFT)
        fence: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight.append((start, end, fence))
        try:
            bulk: list[object] = [to_wire(entries)] if data is None else [to_wire(entries), data]
            reply = await self._call(msg, expect, bulk, copy=False)
            if self.dma_hook is not None:
                await self.dma_hook()
            return reply
        finally:
            fence.set_result(None)
            self._inflight.remove((start, end, fence))
            self.session.dma_done()

    async def transfer(
        self,
        addr: int,
        length: int,
        payload: memoryview | None,
        fault: FaultFn,
        hold: list[Slot] | None = None,
    ) -> tuple[list[memoryview], int]:
        """Read (``payload`` None) or write ``length`` bytes at any ``addr`` through the table.

        Missing translations are faulted in by ``fault`` (from the first missing
        page to the end of the access); a STALE refusal drops the translations
        and starts over, for up to the 1000 ms retry budget. Returns the data
        read, as views of the DMA replies in address order, and the fault calls made.

        With the session's DMA window (SPEC §4.9) a write of ``WINDOW_MIN`` bytes or
        more goes through a slot of it, and so does such a read when ``hold`` is given:
        the data is then a view of the slot, which is appended to ``hold`` and is the
        caller's to give back (``DmaWindow.give_back`` or ``lend``). Without a free
        slot, the plain path.
        """
        window = self.session.dma_window
        wanted = payload is not None or hold is not None
        if window is None or not wanted or length < WINDOW_MIN:
            return await self._transfer(addr, length, payload, fault, None)
        first = addr & ~_PAGE_MASK
        slot = await window.take_soon(addr + length - first)
        if slot is None:
            return await self._transfer(addr, length, payload, fault, None)
        try:
            result = await self._transfer(addr, length, payload, fault, slot)
        except MirrorEvicted:
            window.give_back(slot)  # refused before any copy (NO_MIRROR, FENCED)
            raise
        except DeviceError as exc:
            # hmmd answered (or the access failed here, between requests): no copy runs,
            # unless hmmd said EBUSY (a copy past its deadline may still run).
            if isinstance(exc, RemoteError) and exc.errno == errno.EBUSY:
                window.quarantine(slot)
            else:
                window.give_back(slot)
            raise
        except BaseException:
            # No answer (a timeout, a cancel, a lost connection) or INTERNAL: hmmd may still
            # copy into or out of the slot, through this session's mapping or an earlier one.
            window.quarantine(slot)
            raise
        if payload is None and hold is not None and _in_slot(result[0], slot):
            hold.append(slot)
        else:
            window.give_back(slot)
        return result

    async def _transfer(
        self, addr: int, length: int, payload: memoryview | None, fault: FaultFn, slot: Slot | None
    ) -> tuple[list[memoryview], int]:
        """``transfer``'s loop, through ``slot`` when it has one."""
        write = payload is not None
        need = _VALID_WRITE if write else VALID
        first = addr & ~_PAGE_MASK
        end = addr + length
        npages = (end - first + _PAGE_MASK) >> PAGE_SHIFT
        a, b = self._range(first, npages)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_BUDGET
        faults = 0
        chunk = self.session.max_dma_pages
        while True:
            self._check_live()
            missing = self._first_missing(a, b, need)
            if missing is not None:
                if faults and loop.time() > deadline:
                    raise DeviceError(errno.EBUSY, f"access at {addr:#x} kept faulting")
                data = (await fault(first + (missing << PAGE_SHIFT), npages - missing)).data
                faults += 1
                if (
                    payload is None
                    and missing == 0
                    and data is not None
                    and (len(data) == npages << PAGE_SHIFT)
                ):
                    # The fault read the pages in its own trip, through the entries just
                    # installed (no INVALIDATE came between): that was the device's access.
                    return [data[addr - first : end - first]], faults
                continue
            pieces: list[memoryview] = []
            try:
                for off in range(0, npages, chunk):
                    n = min(chunk, npages - off)
                    entries = self.table[a + off : a + off + n].copy()
                    if not ((entries & need) == need).all():
                        raise _Stale("an invalidation zapped the range mid-access")
                    start = first + (off << PAGE_SHIFT)
                    lo, hi = max(addr, start), min(end, start + (n << PAGE_SHIFT))
                    if slot is not None:
                        await self._through_slot(slot, first, start, n, lo, hi, entries, payload)
                        if payload is None and off + n >= npages:
                            pieces.append(slot.view[addr - first : end - first])
                    elif payload is None:
                        got = await self._reads.read(start, n << PAGE_SHIFT)
                        if got is None:  # no run took it: read alone
                            got = await self._read_run(start, entries)
                        pieces.append(got[lo - start : hi - start])
                    else:
                        whole = hi - lo == n << PAGE_SHIFT
                        msg = DmaWrite(
                            mirror=self.id, start=start, npages=n, offset=lo - start,
                            length=0 if whole else hi - lo,
                        )  # fmt: skip
                        view = payload[lo - addr : hi - addr]
                        await self._dma(msg, Ok, start, n, entries, view)
            except _Stale as exc:
                self._forget(a, b, loop.time() > deadline, f"access at {addr:#x}", exc)
                continue
            return pieces, faults

    async def _through_slot(
        self,
        slot: Slot,
        first: int,
        start: int,
        n: int,
        lo: int,
        hi: int,
        entries: Entries,
        payload: memoryview | None,
    ) -> None:
        """One chunk through the window: the slot's byte ``i`` is the address ``first + i``."""
        at = slot.offset + (start - first)
        if payload is None:
            read = DmaReadInto(mirror=self.id, start=start, npages=n, offset=at)
            await self._dma(read, Ok, start, n, entries, None)
            return
        if start == first:  # the first chunk puts the whole payload in place
            slot.view[lo - first : lo - first + len(payload)] = payload
        whole = hi - lo == n << PAGE_SHIFT
        msg = DmaWriteFrom(
            mirror=self.id, start=start, npages=n, offset=at + (lo - start),
            length=0 if whole else hi - lo,
        )  # fmt: skip
        await self._dma(msg, Ok, start, n, entries, None)

    async def atomic(
        self, addr: int, op: AtomicOp, compare_add: int, swap: int, fault: FaultFn
    ) -> int:
        """An 8-byte atomic at 8-aligned ``addr`` through the table; return the old value."""
        if addr % 8:
            raise DeviceError(errno.EINVAL, f"atomic at {addr:#x} is not 8-byte aligned")
        page = addr & ~_PAGE_MASK
        a, b = self._range(page, 1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_BUDGET
        while True:
            self._check_live()
            if self._first_missing(a, b, _VALID_WRITE) is not None:
                if loop.time() > deadline:
                    raise DeviceError(errno.EBUSY, f"atomic at {addr:#x} kept faulting")
                await fault(page, 1)
                continue
            msg = DmaAtomic(
                mirror=self.id, start=page, offset=addr - page, op=int(op),
                compare_add=compare_add, swap=swap,
            )  # fmt: skip
            try:
                reply, _ = await self._dma(msg, AtomicReply, page, 1, self.table[a:b].copy(), None)
            except _Stale as exc:
                self._forget(a, b, loop.time() > deadline, f"atomic at {addr:#x}", exc)
                continue
            return reply.old

    def _dmirror_fault(self, write: bool) -> FaultFn:
        """dmirror's fault: populate the missing pages, for write if the access writes."""

        async def fault(addr: int, npages: int) -> Faulted:
            """One fault event over the missing pages."""
            return Faulted(await self.fault(addr, npages, write))

        return fault

    async def read(self, addr: int, npages: int) -> ReadResult:
        """HMM_DMIRROR_READ: read ``npages`` at ``addr`` through the mirror, faulting as needed."""
        self._range(addr, npages)
        pieces, faults = await self.transfer(
            addr, npages << PAGE_SHIFT, None, self._dmirror_fault(False)
        )
        return ReadResult(b"".join(pieces), npages, faults)

    async def write(self, addr: int, data: bytes | bytearray | memoryview) -> WriteResult:
        """HMM_DMIRROR_WRITE: write ``data`` (whole pages) at ``addr``, faulting as needed."""
        view = memoryview(data).cast("B")
        if len(view) == 0 or len(view) % PAGE_SIZE:
            raise DeviceError(errno.EINVAL, f"write of {len(view)} bytes is not whole pages")
        if not self.access & Access.WRITE:
            raise DeviceError(errno.EPERM, f"mirror {self.id} has no WRITE access")
        npages = len(view) >> PAGE_SHIFT
        self._range(addr, npages)
        _, faults = await self.transfer(addr, len(view), view, self._dmirror_fault(True))
        return WriteResult(npages, faults)

    async def close(self) -> None:
        """UNREGISTER the mirror and drop its table."""
        if self.dropped is None and not self.released:
            with contextlib.suppress(RemoteError):
                await self.session.exchange(Unregister(mirror=self.id), Ok)
        self._drop("closed")
        self.session.mirrors.pop(self.id, None)
