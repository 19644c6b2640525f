"""An ODP memory region: its mkey, its MTT, its usecount, and how the device faults it.

An explicit MR is one mirror over ``[ALIGN_DOWN(addr), ALIGN(addr + length))``
and its MTT is that mirror's table: one u64 per page, VALID standing for
``MLX5_IB_MTT_READ`` and WRITE for ``MLX5_IB_MTT_WRITE``. Registration maps the
pages already present without faulting (``pagefault_real_mr(SNAPSHOT|ENABLE)``).

An implicit MR (address 0, length ``SIZE_MAX``, ON_DEMAND) covers the whole
user address space. It has no mirror of its own: its 1 GiB children are
mirrors created on the first fault inside them, and a child is dropped once an
invalidation zaps its last mapped page (``destroy_unused_implicit_child_mr``).

Faults follow ``pagefault_real_mr``: a writable MR faults for write (the MTT
then needs no second fault to write), except for PREFETCH, which downgrades.
Where mlx5 would fail a read of a page the process maps read-only through a
writable MR, the model maps that page read-only instead.

Every operation holds the MR's usecount (``mmkey.usecount``) and its child's;
``dereg`` waits for the MR's to drain, a child's drop for the child's. The
per-page fence of an invalidation against in-flight DMA is the mirror's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from hmmirror.client._reaper import reap
from hmmirror.client.errors import DeviceError, MirrorEvicted, RemoteError, device_error
from hmmirror.client.mirror import Faulted, FaultFn, Mirror
from hmmirror.client.mlx5.verbs import (
    IMPLICIT_CHILD_SIZE,
    IMPLICIT_END,
    MAX_PREFETCH_LEN,
    WHOLE_ADDRESS_SPACE,
    WRITABLE,
    AccessFlags,
    Advice,
)
from hmmirror.client.window import Slot
from hmmirror.proto.entries import HMM_PFN_VALID, HMM_PFN_WRITE, PAGE_SHIFT, PAGE_SIZE
from hmmirror.proto.messages import Access, AtomicOp, FaultMode

if TYPE_CHECKING:
    from hmmirror.client.group import SessionGroup
    from hmmirror.client.session import Session

log = logging.getLogger(__name__)

_PAGE_MASK = PAGE_SIZE - 1
#: The counters an MR keeps itself; the invalidation counters live in its mirrors.
_OWN = ("page_faults", "page_faults_handled", "page_prefetch")
_MIRRORED = ("page_invalidations", "page_invalidations_handled")


class _Segment:
    """One mirror of an MR (the whole explicit MR, or one implicit child) and its usecount."""

    def __init__(self, base: int, mirror: Mirror) -> None:
        self.base = base
        self.mirror = mirror
        self.users = 0
        self.idle = asyncio.Event()
        self.idle.set()


class MemoryRegion:
    """An ODP MR of one process; create it with ``Nic.reg_mr``."""

    def __init__(
        self,
        session: Session,
        mrn: int,
        key: int,
        pid: int,
        addr: int,
        length: int,
        access: AccessFlags,
        start_time: int = 0,
        group: SessionGroup | None = None,
    ) -> None:
        #: The session with the hmmd that watches the MR's process (in a group: its owner's,
        #: once a registration found it).
        self.session = session
        #: Sessions with every hmmd of a host that runs several (SPEC §1.7), or None.
        self.group = group
        self.mrn = mrn
        #: mlx5 gives an MR one mkey, used as both its lkey and its rkey.
        self.lkey = self.rkey = key
        self.pid = pid
        self.start_time = start_time
        self.addr = addr
        self.length = length
        self.access = access
        self.implicit = addr == 0 and length == WHOLE_ADDRESS_SPACE
        self.end = IMPLICIT_END if self.implicit else addr + length
        #: ``ib_access_writable``: faults ask for write access.
        self.writable = bool(access & WRITABLE)
        self._base = addr & ~_PAGE_MASK
        self._segments: dict[int, _Segment] = {}
        self._creating: dict[int, asyncio.Future[_Segment]] = {}
        self._counters = dict.fromkeys(_OWN, 0)
        self._retired = dict.fromkeys(_MIRRORED, 0)
        self.users = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.dead = False
        self.children_created = 0
        self.children_dropped = 0
        self._tasks: set[asyncio.Task[None]] = set()

    # --- registration ---------------------------------------------------------------------------

    async def _open(self) -> None:
        """Register the explicit MR's mirror and map what is present (implicit: nothing)."""
        if self.implicit:
            return
        seg = await self._register(self._base, self._span_end() - self._base)
        npages = (self._span_end() - self._base) >> PAGE_SHIFT
        with self._use(seg):
            await seg.mirror.populate(self._base, npages, False, FaultMode.PRESENT)

    async def _mirror(self, base: int, size: int, access: Access) -> Mirror:
        """A mirror of [base, base + size) from the hmmd that watches the MR's process: the
        MR's session, or in a group the owner's, found by following MOVED (SPEC §1.7)."""
        if self.group is None:
            return await self.session.mirror(
                self.pid, base, size, access, start_time=self.start_time
            )
        try:
            return await self.group.mirror(self.pid, base, size, access, start_time=self.start_time)
        finally:
            # The member that answered last: the owner, whose FENCED a retry would heal.
            self.session = self.group.session_for(self.pid)

    def _span_end(self) -> int:
        """End of the explicit MR's page-aligned span."""
        return (self.end + _PAGE_MASK) & ~_PAGE_MASK

    async def _register(self, base: int, size: int) -> _Segment:
        """Mirror [base, base + size) of the MR's process as a new segment."""
        access = Access.READ | Access.WRITE if self.writable else Access.READ
        try:
            mirror = await self._mirror(base, size, access)
        except RemoteError as exc:
            # hmmd ended the session (its EVICTED notice may never have come): every
            # mirror of it is gone there, so every translation goes here too, this MR's
            # other children included; then a fresh session, and register again.
            if not self.session.rehello_if_fenced(exc):
                raise device_error(exc) from exc
            await self.session.rehello()  # joins the HELLO that rehello_if_fenced began
            mirror = await self._mirror(base, size, access)
        self.start_time = mirror.start_time  # later children must be of the same process
        seg = _Segment(base, mirror)
        if self.implicit:
            mirror.on_empty = lambda _m: self._child_emptied(seg)
            self.children_created += 1
        self._segments[base] = seg
        return seg

    async def _segment(self, base: int) -> _Segment:
        """The live segment at ``base``: an implicit child is created on first use, and a
        mirror that hmmd evicted is registered afresh (an evicted mirror keeps nothing)."""
        seg = self._segments.get(base)
        if seg is not None and seg.mirror.dropped is None:
            return seg
        again = ""
        if seg is not None:
            if seg.mirror.released:
                seg.mirror._check_live()  # raises ESRCH: the process exited
            again = seg.mirror.dropped or ""
            self._retire(seg)
        creating = self._creating.get(base)
        if creating is not None:  # another fault is creating it: use that one (xa_cmpxchg)
            return await asyncio.shield(creating)
        fut: asyncio.Future[_Segment] = asyncio.get_running_loop().create_future()
        self._creating[base] = fut
        try:
            size = IMPLICIT_CHILD_SIZE if self.implicit else self._span_end() - self._base
            seg = await self._register(base, size)
            if again:  # the lifecycle line an operator looks for after an hmmd restart
                log.info(
                    "mr %d: pid %d at %#x registered again (its mirror was %s)",
                    self.mrn, self.pid, base, again,
                )  # fmt: skip
            fut.set_result(seg)
            return seg
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: a lone creator must not log "never retrieved"
            raise
        finally:
            del self._creating[base]

    def _retire(self, seg: _Segment) -> None:
        """Forget ``seg``, keeping its invalidation counts in the MR's totals."""
        if self._segments.get(seg.base) is seg:
            del self._segments[seg.base]
            for name in _MIRRORED:
                self._retired[name] += seg.mirror.counters[name]

    def _child_emptied(self, seg: _Segment) -> None:
        """An implicit child holds no page (an invalidation zapped its last one, or its
        users are done and mapped nothing): drop the child."""
        if self._segments.get(seg.base) is not seg or self.dead:
            return
        self._retire(seg)  # new faults create a fresh child from now on
        self.children_dropped += 1
        task = asyncio.ensure_future(self._free_child(seg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _free_child(self, seg: _Segment) -> None:
        """``free_implicit_child_mr_work``: wait out the child's users, then unregister it."""
        await seg.idle.wait()
        try:
            await seg.mirror.close()
        except Exception as exc:  # the session may be gone; the mirror is dropped either way
            log.debug("closing implicit child %#x of mr %d: %s", seg.base, self.mrn, exc)

    async def _deregister(self) -> None:
        """Wait until no operation uses the MR, then drop every mirror (``dereg_mr``)."""
        self.dead = True
        await self._idle.wait()
        for task in list(self._tasks):
            await reap(task)
        for seg in list(self._segments.values()):
            self._retire(seg)
            with contextlib.suppress(Exception):
                await seg.mirror.close()

    # --- usecount -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _use(self, seg: _Segment | None = None) -> Iterator[None]:
        """Hold the MR's usecount (and ``seg``'s) for the duration of an operation."""
        self._hold(seg)
        try:
            yield
        finally:
            self._release(seg)

    def _hold(self, seg: _Segment | None) -> None:
        """Take the MR's usecount, and ``seg``'s."""
        self.users += 1
        self._idle.clear()
        if seg is not None:
            seg.users += 1
            seg.idle.clear()

    def _release(self, seg: _Segment | None) -> None:
        """Give back what ``_hold`` took."""
        if seg is not None:
            seg.users -= 1
            if seg.users == 0:
                seg.idle.set()
                if self.implicit and seg.mirror.held == 0:
                    # destroy_unused_implicit_child_mr: a child that holds nothing (its
                    # faults found nothing mapped) is not kept, or a requester naming GiB
                    # after unmapped GiB would pile up mirrors, here and at hmmd (whose
                    # per-peer caps every hm-agent of this uid shares).
                    self._child_emptied(seg)
        self.users -= 1
        if self.users == 0:
            self._idle.set()

    def _pieces(self, addr: int, length: int) -> Iterator[tuple[int, int, int]]:
        """Split [addr, addr + length) by segment: (segment base, start, end) each."""
        if not self.implicit:
            yield self._base, addr, addr + length
            return
        end = addr + length
        while addr < end:
            base = addr & ~(IMPLICIT_CHILD_SIZE - 1)
            stop = min(end, base + IMPLICIT_CHILD_SIZE)
            yield base, addr, stop
            addr = stop

    def covers(self, addr: int, length: int) -> bool:
        """Whether [addr, addr + length) lies inside the MR."""
        return self.addr <= addr and addr + length <= self.end and length >= 0

    # --- faults -----------------------------------------------------------------------------------

    async def _fault(
        self, seg: _Segment, addr: int, npages: int, need_write: bool, read: bool = False
    ) -> Faulted:
        """Resolve a device page fault on [addr, +npages) of ``seg``; count it.

        With ``read`` (a read access that missed) hmmd also reads the pages in the
        fault's trip, when it can: the result then carries their data.
        """
        write = self.writable
        mirror = seg.mirror
        try:
            if read:
                done = await mirror.populate_read(addr, npages, write)
            else:
                done = Faulted(await mirror.populate(addr, npages, write))
        except DeviceError as exc:
            if exc.errno != errno.EPERM or need_write or not write:
                raise
            # A page the process maps read-only: map it read-only.
            if read:
                done = await mirror.populate_read(addr, npages, False)
            else:
                done = Faulted(await mirror.populate(addr, npages, False))
        self._counters["page_faults"] += done.installed
        self._counters["page_faults_handled"] += 1
        return done

    async def page_fault(self, addr: int, length: int = 0) -> int:
        """A device page fault at ``addr`` (the RDMA subtype); return the pages mapped.

        ``length`` 0 means the device could not tell the access's length: the
        page at ``addr`` is faulted, and then up to ``MAX_PREFETCH_LEN`` after it
        is prefetched in the background, as mlx5 does after resuming the QP. That
        prefetch counts as faults, as in the kernel.
        """
        self._check_usable()
        unknown = length == 0
        span = PAGE_SIZE if unknown else length
        if not self.covers(addr, span):
            raise DeviceError(errno.EINVAL, f"fault [{addr:#x}, +{span}) is outside mr {self.mrn}")
        mapped = 0
        for base, lo, hi in self._pieces(addr, span):
            seg = await self._segment(base)
            with self._use(seg):
                first = lo & ~_PAGE_MASK
                npages = (hi - first + _PAGE_MASK) >> PAGE_SHIFT
                mapped += (await self._fault(seg, first, npages, False)).installed
        if unknown:
            after = (addr & ~_PAGE_MASK) + PAGE_SIZE
            more = min(MAX_PREFETCH_LEN, self.end - after)
            if more > 0:
                self._background(self._fault_quietly(after, more))
        return mapped

    async def _fault_quietly(self, addr: int, length: int) -> None:
        """The prefetch after a fault of unknown length: failures only end it."""
        try:
            await self.page_fault(addr, length)
        except Exception as exc:
            log.debug("prefetch after a fault at %#x of mr %d stopped: %s", addr, self.mrn, exc)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task holding the MR's usecount, as mlx5's prefetch work does."""

        async def hold() -> None:
            """Keep the usecount until ``coro`` is done."""
            with self._use():
                await coro

        task = asyncio.ensure_future(hold())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- prefetch ---------------------------------------------------------------------------------

    async def prefetch(self, addr: int, length: int, advice: Advice) -> int:
        """``advise_mr`` on [addr, addr + length): map pages as ``advice`` says; return how many."""
        self._check_usable()
        if advice == Advice.PREFETCH_WRITE and not self.writable:
            raise DeviceError(
                errno.EPERM, f"PREFETCH_WRITE on mr {self.mrn}, which is not writable"
            )
        if not self.covers(addr, length) or length <= 0:
            raise DeviceError(
                errno.EINVAL, f"prefetch [{addr:#x}, +{length}) is outside mr {self.mrn}"
            )
        # NO_FAULT maps present pages with the WRITE bit their PTE has (on a writable MR).
        mode = FaultMode.PRESENT if advice == Advice.PREFETCH_NO_FAULT else FaultMode.POPULATE
        write = advice == Advice.PREFETCH_WRITE
        mapped = 0
        with self._use():
            for base, lo, hi in self._pieces(addr, length):
                seg = await self._segment(base)
                with self._use(seg):
                    first = lo & ~_PAGE_MASK
                    npages = (hi - first + _PAGE_MASK) >> PAGE_SHIFT
                    got = await seg.mirror.populate(
                        first, npages, write, mode, downgrade=advice == Advice.PREFETCH
                    )
                    mapped += got
                    self._counters["page_prefetch"] += got
        return mapped

    # --- device accesses --------------------------------------------------------------------------

    def _check_usable(self) -> None:
        """Refuse work on a deregistered MR."""
        if self.dead:
            raise DeviceError(errno.ENOENT, f"mr {self.mrn} is deregistered")

    async def read(
        self, addr: int, length: int, hold: list[Slot] | None = None
    ) -> list[memoryview]:
        """Device READ of [addr, addr + length): views of the data, in address order. With
        ``hold`` the data may be in DMA window slots, appended there (``Mirror.transfer``)."""
        out: list[memoryview] = []
        with self._use():
            for base, lo, hi in self._pieces(addr, length):
                out.extend(await self._transfer(base, lo, hi, None, hold))
        return out

    def read_now(self, addr: int, length: int) -> asyncio.Future[memoryview | None] | None:
        """A small device READ without a task of its own (``Mirror.read_now``): a future of
        its data, of None when the caller must take ``read`` after all, or None at once
        (the MR is deregistered, or its segment there is not live). The usecounts are
        held until the future is done."""
        if self.dead or length <= 0:
            return None
        # The first piece's segment: a READ across two implicit children lies beyond its
        # mirror's end, which Mirror.read_now declines.
        seg = self._segments.get(next(self._pieces(addr, length))[0])
        if seg is None:
            return None
        got = seg.mirror.read_now(addr, length)
        if got is None:
            return None
        self._hold(seg)
        got.add_done_callback(lambda _: self._release(seg))
        return got

    async def write(self, addr: int, data: memoryview) -> None:
        """Device WRITE of ``data`` at ``addr``."""
        with self._use():
            for base, lo, hi in self._pieces(addr, len(data)):
                await self._transfer(base, lo, hi, data[lo - addr : hi - addr])

    async def _transfer(
        self,
        base: int,
        lo: int,
        hi: int,
        payload: memoryview | None,
        hold: list[Slot] | None = None,
    ) -> list[memoryview]:
        """Move [lo, hi) through the segment at ``base``; once more on a fresh mirror if
        hmmd evicted this one meanwhile (an evicted mirror keeps no translation)."""
        for attempt in (1, 2):
            seg = await self._segment(base)
            with self._use(seg):
                fault = self._fault_fn(seg, payload is not None)
                try:
                    pieces, _ = await seg.mirror.transfer(lo, hi - lo, payload, fault, hold)
                    return pieces
                except MirrorEvicted:
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    async def atomic(self, addr: int, op: AtomicOp, compare_add: int, swap: int) -> int:
        """An 8-byte atomic at ``addr``; return the old value."""
        base = next(self._pieces(addr, 8))[0]
        with self._use():
            for attempt in (1, 2):
                seg = await self._segment(base)
                with self._use(seg):
                    fault = self._fault_fn(seg, True)
                    try:
                        return await seg.mirror.atomic(addr, op, compare_add, swap, fault)
                    except MirrorEvicted:
                        if attempt == 2:
                            raise
        raise AssertionError("unreachable")

    def _fault_fn(self, seg: _Segment, need_write: bool) -> FaultFn:
        """The mirror's fault callback for an access through ``seg``."""

        async def fault(addr: int, npages: int) -> Faulted:
            """Fault the pages in for this access (a read's fault also brings the data)."""
            return await self._fault(seg, addr, npages, need_write, read=not need_write)

        return fault

    # --- what it holds --------------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """``rdma stat mr``'s counters, summed over the MR's mirrors, live and dropped."""
        out = {name: self._counters.get(name, 0) for name in _OWN}
        for name in _MIRRORED:
            out[name] = self._retired[name] + sum(
                seg.mirror.counters[name] for seg in self._segments.values()
            )
        return {
            name: out[name]
            for name in (
                "page_faults",
                "page_faults_handled",
                "page_invalidations",
                "page_invalidations_handled",
                "page_prefetch",
            )
        }

    @property
    def children(self) -> list[int]:
        """Base addresses of an implicit MR's live children."""
        return sorted(self._segments) if self.implicit else []

    @property
    def mtt(self) -> np.ndarray:
        """An explicit MR's MTT: one u64 per page of its page-aligned span."""
        if self.implicit:
            raise DeviceError(errno.EINVAL, "an implicit MR's MTT is its children's; see entry()")
        seg = self._segments.get(self._base)
        return seg.mirror.table if seg is not None else np.zeros(0, dtype=np.uint64)

    @property
    def mtt_bytes(self) -> int:
        """Bytes of MTT the MR holds now, over every live mirror."""
        return sum(seg.mirror.table.nbytes for seg in self._segments.values())

    def entry(self, addr: int) -> int:
        """The MTT entry for the page at ``addr`` (0: not mapped)."""
        base = next(self._pieces(addr & ~_PAGE_MASK, 1))[0]
        seg = self._segments.get(base)
        if seg is None or not seg.mirror.start <= addr < seg.mirror.end:
            return 0
        return int(seg.mirror.table[(addr - seg.mirror.start) >> PAGE_SHIFT])

    def mapped(self, addr: int) -> bool:
        """Whether the page at ``addr`` has a translation (``MLX5_IB_MTT_READ``)."""
        return bool(self.entry(addr) & HMM_PFN_VALID)

    def writable_at(self, addr: int) -> bool:
        """Whether the page at ``addr`` is mapped for write (``MLX5_IB_MTT_WRITE``)."""
        return bool(self.entry(addr) & HMM_PFN_WRITE)
