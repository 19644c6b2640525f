"""The NIC: memory registration, keys, prefetch advice, and device accesses by key.

``Nic`` is the device object of the model (an ``ib_device`` with one PD). It
owns the mkey table, so every access names a key and an address exactly as a
work request does; a key that is unknown, an access outside the MR, or one the
MR's access flags do not grant is a remote access error
(``IBV_WC_REM_ACCESS_ERR``), raised as ``RemoteAccessError``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hmmirror.client.errors import DeviceError, RemoteAccessError
from hmmirror.client.group import SessionGroup
from hmmirror.client.mlx5.mr import MemoryRegion
from hmmirror.client.mlx5.verbs import (
    ADVISE_FLUSH,
    WHOLE_ADDRESS_SPACE,
    AccessFlags,
    Advice,
    Sge,
)
from hmmirror.client.window import Slot
from hmmirror.proto.messages import MAX_MIRROR_PAGES, USER_ADDR_END, AtomicOp

if TYPE_CHECKING:
    from hmmirror.client.session import Session

log = logging.getLogger(__name__)

#: mlx5's mkeys are a 24-bit index and an 8-bit variant: a requester who knows one key
#: finds the others in a few hundred tries. The model's keys are the 24-bit index and
#: ``KEY_RANDOM_BITS`` drawn from ``secrets``, 64 bits in all, so that a key is a secret.
KEY_RANDOM_BITS = 40
_MAX_INDEX = (1 << 24) - 1
_REMOTE_RIGHT = {
    "read": AccessFlags.REMOTE_READ,
    "write": AccessFlags.REMOTE_WRITE,
    "atomic": AccessFlags.REMOTE_ATOMIC,
}


class Nic:
    """An mlx5-model device whose memory accesses go through hmmd via ``session`` (or the
    hmmds of a ``SessionGroup``)."""

    def __init__(self, session: Session | SessionGroup, name: str = "mlx5_0") -> None:
        #: With a group (a host that runs several hmmds, SPEC §1.7) each MR is registered
        #: with the hmmd that watches its process; ``session`` is then the group's first.
        self.group = session if isinstance(session, SessionGroup) else None
        self.session = session.sessions[0] if isinstance(session, SessionGroup) else session
        self.name = name
        self._mrs: dict[int, MemoryRegion] = {}
        self._next_index = 1
        self._tasks: set[asyncio.Task[None]] = set()

    # --- registration -----------------------------------------------------------------------------

    async def reg_mr(
        self, pid: int, addr: int, length: int, access: AccessFlags, *, start_time: int = 0
    ) -> MemoryRegion:
        """``ibv_reg_mr`` on process ``pid``: an ODP MR over [addr, addr + length).

        ``addr`` 0 with ``length`` ``WHOLE_ADDRESS_SPACE`` registers an implicit
        MR. Raises DeviceError: EINVAL for a bad range or REMOTE_WRITE/ATOMIC
        without LOCAL_WRITE (as verbs does), EOPNOTSUPP without ON_DEMAND (the
        model has no pinned registration), ESRCH for no such process.
        """
        access = AccessFlags(access)
        if not access & AccessFlags.ON_DEMAND:
            raise DeviceError(
                errno.EOPNOTSUPP, "only ON_DEMAND (ODP) registration exists in this model"
            )
        if (
            access & (AccessFlags.REMOTE_WRITE | AccessFlags.REMOTE_ATOMIC)
            and not access & AccessFlags.LOCAL_WRITE
        ):
            raise DeviceError(errno.EINVAL, "REMOTE_WRITE and REMOTE_ATOMIC need LOCAL_WRITE")
        implicit = addr == 0 and length == WHOLE_ADDRESS_SPACE
        if not implicit:
            if length <= 0 or addr < 0 or addr + length > USER_ADDR_END:
                raise DeviceError(
                    errno.EINVAL, f"MR [{addr:#x}, +{length:#x}) is empty or outside user space"
                )
            if (length >> 12) + 2 > MAX_MIRROR_PAGES:
                raise DeviceError(errno.EINVAL, f"MR of {length} bytes is larger than 256 GiB")
        if self._next_index > _MAX_INDEX:
            raise DeviceError(errno.ENOMEM, "no mkey index left")
        index = self._next_index
        self._next_index += 1
        key = (index << KEY_RANDOM_BITS) | secrets.randbits(KEY_RANDOM_BITS)
        session = self.session if self.group is None else self.group.session_for(pid)
        mr = MemoryRegion(session, index, key, pid, addr, length, access, start_time, self.group)
        try:
            await mr._open()
        except BaseException:
            await mr._deregister()
            raise
        self._mrs[key] = mr
        return mr

    async def dereg_mr(self, mr: MemoryRegion) -> None:
        """``ibv_dereg_mr``: unpublish the key, wait for the usecount to drain, drop the MR."""
        if self._mrs.get(mr.lkey) is not mr:
            raise DeviceError(errno.EINVAL, f"mr {mr.mrn} is not registered on {self.name}")
        del self._mrs[mr.lkey]  # xa_erase(odp_mkeys): no new access finds it
        await mr._deregister()

    async def close(self) -> None:
        """Deregister every MR."""
        for mr in list(self._mrs.values()):
            await self.dereg_mr(mr)
        for task in list(self._tasks):
            task.cancel()

    @property
    def mrs(self) -> list[MemoryRegion]:
        """The registered MRs, oldest first."""
        return sorted(self._mrs.values(), key=lambda m: m.mrn)

    # --- lookups --------------------------------------------------------------------------------

    def find(self, key: int) -> MemoryRegion | None:
        """The MR ``key`` names, unchecked; None for an unknown key."""
        return self._mrs.get(key)

    def lookup(self, key: int, addr: int, length: int, right: str, remote: bool) -> MemoryRegion:
        """The MR ``key`` names, checked to cover the access and to grant ``right``.

        ``right`` is "read", "write" or "atomic"; a local access (lkey) may always
        read and needs LOCAL_WRITE to write. Raises RemoteAccessError.
        """
        mr = self._mrs.get(key)
        if mr is None:
            raise RemoteAccessError(f"no MR with key {key:#x} on {self.name}")
        if not mr.covers(addr, length):
            raise RemoteAccessError(
                f"[{addr:#x}, +{length}) is outside mr {mr.mrn} [{mr.addr:#x}, {mr.end:#x})"
            )
        if remote:
            needed = _REMOTE_RIGHT[right]
        else:
            needed = AccessFlags.LOCAL_WRITE if right != "read" else AccessFlags(0)
        if needed and not mr.access & needed:
            raise RemoteAccessError(f"mr {mr.mrn} was registered without {needed.name}")
        return mr

    # --- prefetch -------------------------------------------------------------------------------

    async def advise_mr(
        self, advice: Advice, flags: int, sg_list: Sequence[Sge | tuple[int, int, int]]
    ) -> int:
        """``ibv_advise_mr`` over ``Sge(addr, length, lkey)`` entries, in ``struct ibv_sge``'s
        order (plain tuples in that order too); return pages mapped.

        With ``ADVISE_FLUSH`` the prefetch runs now and its errors are raised;
        otherwise it runs in the background (holding each MR's usecount) and
        this returns 0 at once. EINVAL for an unknown lkey or a range outside its
        MR, EPERM for PREFETCH_WRITE on an MR that is not writable.
        """
        advice = Advice(advice)
        work: list[tuple[MemoryRegion, int, int]] = []
        for addr, length, lkey in sg_list:
            mr = self._mrs.get(lkey)
            if mr is None:
                raise DeviceError(errno.EINVAL, f"no MR with lkey {lkey:#x}")
            if not mr.covers(addr, length) or length <= 0:
                raise DeviceError(errno.EINVAL, f"[{addr:#x}, +{length}) is outside mr {mr.mrn}")
            if advice == Advice.PREFETCH_WRITE and not mr.writable:
                raise DeviceError(errno.EPERM, f"PREFETCH_WRITE on mr {mr.mrn}, which is read-only")
            work.append((mr, addr, length))
        if flags & ADVISE_FLUSH:
            return sum([await mr.prefetch(addr, length, advice) for mr, addr, length in work])
        for mr, addr, length in work:
            mr._background(self._prefetch_quietly(mr, addr, length, advice))
        return 0

    @staticmethod
    async def _prefetch_quietly(mr: MemoryRegion, addr: int, length: int, advice: Advice) -> None:
        """An asynchronous prefetch: a failure is logged, as the kernel's work item drops it."""
        try:
            await mr.prefetch(addr, length, advice)
        except Exception as exc:
            log.debug("prefetch of mr %d at %#x failed: %s", mr.mrn, addr, exc)

    # --- device accesses ------------------------------------------------------------------------

    async def read(
        self,
        key: int,
        addr: int,
        length: int,
        *,
        remote: bool = True,
        hold: list[Slot] | None = None,
    ) -> list[memoryview]:
        """READ ``length`` bytes at ``addr`` of ``key``; the data as views, in order. With
        ``hold`` the data may be in DMA window slots, appended there: the caller gives
        them back once the views are no longer used."""
        mr = self.lookup(key, addr, length, "read", remote)
        if length == 0:
            return []
        return await mr.read(addr, length, hold)

    def read_now(
        self, key: int, addr: int, length: int
    ) -> asyncio.Future[memoryview | None] | None:
        """A remote READ of ``length`` bytes at ``addr`` of ``key`` without a task of its own,
        when its translations are all present (``MemoryRegion.read_now``): a future of the
        data, or of None when the caller must take ``read`` after all. None at once when it
        cannot go this way (``read`` then answers it, errors included)."""
        try:
            mr = self.lookup(key, addr, length, "read", True)
        except RemoteAccessError:
            return None
        return mr.read_now(addr, length)

    async def write(
        self, key: int, addr: int, data: bytes | bytearray | memoryview, *, remote: bool = True
    ) -> None:
        """WRITE ``data`` at ``addr`` of ``key``."""
        view = memoryview(data).cast("B")
        mr = self.lookup(key, addr, len(view), "write", remote)
        if len(view):
            await mr.write(addr, view)

    async def atomic(
        self, key: int, addr: int, op: AtomicOp, compare_add: int, swap: int = 0
    ) -> int:
        """An 8-byte remote atomic at 8-aligned ``addr`` of ``key``; return the old value."""
        mr = self.lookup(key, addr, 8, "atomic", True)
        if addr % 8:
            raise DeviceError(errno.EINVAL, f"atomic at {addr:#x} is not 8-byte aligned")
        return await mr.atomic(addr, AtomicOp(op), compare_add, swap)

    # --- statistics -----------------------------------------------------------------------------

    def stat_mr(self) -> list[dict[str, int]]:
        """One row per MR: its identity and ``rdma stat mr``'s counters."""
        rows = []
        for mr in self.mrs:
            row = {
                "mrn": mr.mrn,
                "rkey": mr.rkey,
                "pid": mr.pid,
                "addr": 0 if mr.implicit else mr.addr,
                "length": 0 if mr.implicit else mr.length,
                "access": int(mr.access),
            }
            row.update(mr.counters)
            rows.append(row)
        return rows
