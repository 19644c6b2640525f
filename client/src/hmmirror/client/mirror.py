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
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import operator
import types
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import numpy as np
import numpy.typing as npt
from hmmirror.client.errors import DeviceError, Evicted, RemoteError, device_error
from hmmirror.proto.codec import Envelope
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
    DmaWrite,
    Event,
    Fault,
    FaultMode,
    FaultReadReply,
    FaultReply,
    Message,
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

    async def request(
        self,
        msg: Message,
        bulk: Sequence[Any] = (),
        *,
        timeout: float | None = None,
        expect: type[Message] | None = None,
        copy: bool = True,
    ) -> Envelope:
        """Send ``msg`` and await its reply."""
        ...

    def dma_done(self) -> None:
        """A DMA finished: acks held behind it may go out."""


_VALID = np.uint64(HMM_PFN_VALID)
_VALID_WRITE = np.uint64(HMM_PFN_VALID | HMM_PFN_WRITE)
_NOT_WRITE = ~np.uint64(HMM_PFN_WRITE)
_PAGE_MASK = PAGE_SIZE - 1
#: Faults the pages [addr, +npages) in, however the caller's device model wants it. It may
#: return those pages' data, read in the same trip, which then serves a read access.
FaultFn = Callable[[int, int], Awaitable[object]]
#: How many invalidations a mirror remembers in ``events`` (for tests and diagnostics).
MAX_EVENTS_KEPT = 4096
#: Events that end the whole mirror: they always take the careful path.
_WHOLE_MIRROR = frozenset((int(Event.RELEASE), int(Event.EVICT)))
_EVENT_FIELD = operator.itemgetter(3)
#: Event by wire value, without an Enum call per item.
_EVENT_OF = tuple(Event)
COUNTER_NAMES = (
    "page_faults",
    "page_faults_handled",
    "page_invalidations",
    "page_invalidations_handled",
)
#: ``rdma stat mr``'s counters, in its order; mirrors keep the first four.
MR_COUNTER_NAMES = (*COUNTER_NAMES, "page_prefetch")


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


class Mirror:
    """One agent's mirror of [start, end) of a target, with its device page table."""

    def __init__(
        self, session: MirrorHost, reg: Registered, start: int, length: int, access: Access
    ) -> None:
        self.session = session
        self.id = reg.mirror
        self.pid = reg.pid
        self.start_time = reg.start_time
        self.start = start
        self.end = start + length
        self.npages = length >> PAGE_SHIFT
        self.access = access
        #: The device page table: one hmm_pfn u64 per page. Read it; change it only
        #: through the mirror's methods, which keep ``_held`` exact.
        self.table: Entries = np.zeros(self.npages, dtype=np.uint64)
        #: How many entries of ``table`` are VALID: zapping an empty table costs nothing.
        self._held = 0
        self.seq = reg.seq
        self._gen = 0
        self._counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.counters: Mapping[str, int] = types.MappingProxyType(self._counters)
        #: Fault replies thrown away because an invalidation raced them (read_retry).
        self.retries = 0
        #: True once the target exited (RELEASE).
        self.released = False
        self.dropped: str | None = None
        self._evicted = False
        self._inflight: list[tuple[int, int, asyncio.Future[None]]] = []
        self._events: list[tuple[int, int, int, int]] = []
        #: Testing hook: awaited between a FAULT reply and the read_retry check.
        self.fault_hook: Callable[[], Awaitable[None]] | None = None
        #: Testing hook: awaited while a DMA is still in flight, after hmmd answered it (a
        #: device still moving the data): an overlapping invalidation's ACK must wait.
        self.dma_hook: Callable[[], Awaitable[None]] | None = None
        #: Called when an invalidation zapped this mirror's last VALID entry.
        self.on_empty: Callable[[Mirror], None] | None = None

    # --- called by the session's drain loop (the invalidate callback) ---------------------------

    def _invalidate(
        self, seq: int, start: int, end: int, event: Event
    ) -> list[asyncio.Future[None]]:
        """mmu_interval_set_seq, zap, and return the in-flight DMAs the ACK must wait for."""
        self.seq = seq
        self._gen += 1
        if len(self._events) < MAX_EVENTS_KEPT:
            self._events.append((seq, start, end, int(event)))
        lo, hi = max(start, self.start), min(end, self.end)
        if self._held and lo < hi:
            a, b = (lo - self.start) >> PAGE_SHIFT, (hi - self.start) >> PAGE_SHIFT
            zapped = int(np.count_nonzero(self.table[a:b] >= _VALID))
            if zapped:
                self.table[a:b] = 0
                self._held -= zapped
                self._counters["page_invalidations"] += zapped
                self._counters["page_invalidations_handled"] += 1
                if self._held == 0 and self.on_empty is not None:
                    self.on_empty(self)
        if event == Event.RELEASE:
            self.released = True
            self.table[:] = 0
            self._held = 0
        elif event == Event.EVICT:  # hmmd removed the mirror (its watcher could not go on)
            self._drop("evicted by hmmd", evicted=True)
        return [f for s, e, f in self._inflight if s < end and start < e and not f.done()]

    def _invalidate_items(
        self, items: tuple[tuple[int, int, int, int], ...]
    ) -> list[asyncio.Future[None]]:
        """Apply one INVALIDATE's items ``[seq, start, end, event]``; return the DMAs to wait for.

        The common case, a table with nothing to zap and no DMA in flight, costs
        one pass over the items whatever their number.
        """
        if self._held or self._inflight or not _WHOLE_MIRROR.isdisjoint(map(_EVENT_FIELD, items)):
            fences: list[asyncio.Future[None]] = []
            for seq, start, end, event in items:
                kind = _EVENT_OF[event] if event < len(_EVENT_OF) else Event.CLEAR
                fences.extend(self._invalidate(seq, start, end, kind))
            return fences
        if items:
            self.seq = items[-1][0]
        self._gen += 1
        room = MAX_EVENTS_KEPT - len(self._events)
        if room > 0:
            self._events.extend(items[:room])
        return []

    @property
    def events(self) -> list[tuple[int, int, Event]]:
        """The first invalidations this mirror received: (start, end, event)."""
        return [
            (start, end, _EVENT_OF[ev] if ev < len(_EVENT_OF) else Event.CLEAR)
            for _, start, end, ev in self._events
        ]

    def _drop(self, reason: str, evicted: bool = False) -> None:
        """The mirror is gone (session lost, evicted, closed): no translation survives."""
        self.table[:] = 0
        self._held = 0
        self._gen += 1
        self.dropped = reason
        self._evicted = self._evicted or evicted

    # --- helpers --------------------------------------------------------------------------------

    def _check_live(self) -> None:
        """Raise if the mirror is unusable: its target exited, or it was evicted or dropped."""
        if self.released:
            raise DeviceError(errno.ESRCH, f"process {self.pid} of mirror {self.id} exited")
        if self._evicted:
            raise Evicted(f"mirror {self.id}: {self.dropped}")
        if self.dropped is not None:
            raise DeviceError(errno.ENODEV, f"mirror {self.id}: {self.dropped}")

    def _range(self, addr: int, npages: int) -> tuple[int, int]:
        """Check [addr, +npages) is page-aligned and inside the mirror; return its table slice."""
        if addr % PAGE_SIZE or npages <= 0:
            raise DeviceError(errno.EINVAL, f"bad range {addr:#x} + {npages} pages")
        end = addr + (npages << PAGE_SHIFT)
        if addr < self.start or end > self.end:
            raise DeviceError(
                errno.EINVAL,
                f"[{addr:#x}, {end:#x}) is outside mirror [{self.start:#x}, {self.end:#x})",
            )
        return (addr - self.start) >> PAGE_SHIFT, ((addr - self.start) >> PAGE_SHIFT) + npages

    async def _call(self, *args: object, **kw: object) -> Envelope:
        """A session request, hmmd's refusals turned into _Stale, Evicted or DeviceError.

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
                return await self.session.request(*args, **kw)  # type: ignore[arg-type]
            except RemoteError as exc:
                if not (
                    exc.code == ErrorCode.EAGAIN
                    and isinstance(args[0], Fault | DmaRead)  # nothing was done: ask again
                    and loop.time() + pause < deadline
                ):
                    self._refused(exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _refused(self, exc: RemoteError) -> NoReturn:
        """Raise hmmd's refusal as _Stale, Evicted or DeviceError."""
        if exc.code == ErrorCode.STALE:
            raise _Stale(exc.message) from exc
        if exc.code in (ErrorCode.NO_MIRROR, ErrorCode.FENCED, ErrorCode.NO_SESSION):
            self._check_live()
            raise Evicted(f"mirror {self.id}: {exc.message}") from exc
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
            env = await self._call(msg)
            if not isinstance(env.msg, FaultReply | FaultReadReply):
                raise RemoteError(ErrorCode.BAD_MESSAGE, f"expected fault_reply, got {env.type}")
            entries = from_wire(env.bulk[0], npages)
            if self.fault_hook is not None:
                await self.fault_hook()
            if self._gen == gen:  # not mmu_interval_read_retry: install with no await in between
                return entries, env.bulk[1] if len(env.bulk) > 1 else None
            self.retries += 1
            # hmmd recorded the discarded reply as what this mirror holds for the range,
            # and judges later changes against it: an older entry kept here could go
            # stale with no INVALIDATE ever naming it. Hold nothing there instead.
            self._zap_slots(addr, npages)
            if loop.time() > deadline:
                raise DeviceError(errno.EBUSY, f"fault at {addr:#x} kept racing invalidations")

    def _zap_slots(self, addr: int, npages: int) -> None:
        """Drop this mirror's own entries for [addr, +npages) (no INVALIDATE involved)."""
        a = (addr - self.start) >> PAGE_SHIFT
        dst = self.table[a : a + npages]
        zapped = int(np.count_nonzero(dst >= _VALID)) if self._held else 0
        if zapped:
            dst[:] = 0
            self._held -= zapped

    def _install(self, a: int, entries: Entries, downgrade: bool) -> int:
        """Install ``entries`` at table slot ``a`` (others there dropped); return how many."""
        if downgrade:
            entries &= _NOT_WRITE
        n = len(entries)
        dst = self.table[a : a + n]
        before = int(np.count_nonzero(dst >= _VALID)) if self._held else 0
        if entries.min() >= _VALID:  # every entry VALID: the usual populate result
            dst[:] = entries
            self._held += n - before
            return n
        valid = entries >= _VALID
        # Not VALID now means not held: hmmd's record of this mirror says so too (it
        # keeps only VALID entries), so an older entry kept here would never be invalidated.
        dst[:] = np.where(valid, entries, np.uint64(0))
        self._held += int(np.count_nonzero(valid)) - before
        return int(np.count_nonzero(valid))

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

    async def populate_read(
        self, addr: int, npages: int, write: bool
    ) -> tuple[int, memoryview | None]:
        """``populate`` of at most ``max_dma_pages`` that also reads the pages in the same trip.

        Returns the pages installed and their data (None if hmmd could not read
        them then: the caller reads as usual).
        """
        a, _ = self._range(addr, npages)
        if write and not self.access & Access.WRITE:
            raise DeviceError(errno.EPERM, f"mirror {self.id} has no WRITE access")
        read = npages <= self.session.max_dma_pages
        entries, data = await self._fault_range(addr, npages, write, FaultMode.POPULATE, read)
        return self._install(a, entries, False), data

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

    def _first_missing(self, a: int, b: int, need: np.uint64) -> int | None:
        """Offset from ``a`` of the first entry in [a, b) lacking ``need``, or None."""
        bad = np.flatnonzero((self.table[a:b] & need) != need)
        return int(bad[0]) if len(bad) else None

    async def _dma(
        self,
        msg: DmaRead | DmaWrite | DmaAtomic,
        start: int,
        npages: int,
        entries: Entries,
        data: memoryview | None,
    ) -> Envelope:
        """Send a DMA request as an in-flight fence that overlapping ACKs wait for."""
        end = start + (npages << PAGE_SHIFT)
        fence: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight.append((start, end, fence))
        try:
            bulk: list[object] = [to_wire(entries)] if data is None else [to_wire(entries), data]
            env = await self._call(msg, bulk, copy=False)
            if self.dma_hook is not None:
                await self.dma_hook()
            return env
        finally:
            fence.set_result(None)
            self._inflight.remove((start, end, fence))
            self.session.dma_done()

    def _forget(self, a: int, b: int, out_of_time: bool, what: str, why: _Stale) -> None:
        """hmmd judged the translations of table slots [a, b) stale: drop them, so the
        retry re-faults instead of presenting them again (SPEC: zap the named entries);
        EBUSY once the retry budget is spent."""
        zapped = int(np.count_nonzero(self.table[a:b] >= _VALID))
        self.table[a:b] = 0
        self._held -= zapped
        if out_of_time:
            raise DeviceError(errno.EBUSY, f"{what} kept going stale: {why}") from why

    async def transfer(
        self, addr: int, length: int, payload: memoryview | None, fault: FaultFn
    ) -> tuple[list[memoryview], int]:
        """Read (``payload`` None) or write ``length`` bytes at any ``addr`` through the table.

        Missing translations are faulted in by ``fault`` (from the first missing
        page to the end of the access); a STALE refusal drops the translations
        and starts over, for up to the 1000 ms retry budget. Returns the data
        read, as views of the DMA replies in address order, and the fault calls made.
        """
        write = payload is not None
        need = _VALID_WRITE if write else _VALID
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
                data = await fault(first + (missing << PAGE_SHIFT), npages - missing)
                faults += 1
                if (
                    payload is None
                    and missing == 0
                    and isinstance(data, memoryview)
                    and len(data) == npages << PAGE_SHIFT
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
                    if payload is None:
                        read = DmaRead(mirror=self.id, start=start, npages=n)
                        env = await self._dma(read, start, n, entries, None)
                        pieces.append(env.bulk[0][lo - start : hi - start])
                    else:
                        whole = hi - lo == n << PAGE_SHIFT
                        msg = DmaWrite(
                            mirror=self.id, start=start, npages=n, offset=lo - start,
                            length=0 if whole else hi - lo,
                        )  # fmt: skip
                        await self._dma(msg, start, n, entries, payload[lo - addr : hi - addr])
            except _Stale as exc:
                self._forget(a, b, loop.time() > deadline, f"access at {addr:#x}", exc)
                continue
            return pieces, faults

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
                env = await self._dma(msg, page, 1, self.table[a:b].copy(), None)
            except _Stale as exc:
                self._forget(a, b, loop.time() > deadline, f"atomic at {addr:#x}", exc)
                continue
            assert isinstance(env.msg, AtomicReply)
            return env.msg.old

    def _dmirror_fault(self, write: bool) -> FaultFn:
        """dmirror's fault: populate the missing pages, for write if the access writes."""
        return lambda addr, npages: self.fault(addr, npages, write)

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
                await self.session.request(Unregister(mirror=self.id))
        self._drop("closed")
        self.session.mirrors.pop(self.id, None)
