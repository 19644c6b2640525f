"""The checker agent's logged WRITEs and atomics: each leaves its intent, then its outcome.

A WRITE or an atomic is logged to ``stamps.DMA_LOG`` before it is sent
(unbuffered, so an agent SIGKILLed in flight leaves it), then with what became
of it: landed, with its send and reply times (and an atomic's old value), or
refused before anything landed (WRITE_FAILED, ATOMIC_FAILED: which refusals
prove that is ``nothing_copied``; ``stamps`` says why). The test-only flags
``--lie-writes`` and ``--lie-atomics`` plant the faults the oracles must catch.
"""

from __future__ import annotations

import errno
import random
import time
from typing import IO, Any

from hmmirror.client import DeviceError, RemoteError
from hmmirror.client.mlx5 import AtomicOp, MemoryRegion, Nic
from hmmirror.tools.check.stamps import (
    ATOMIC_FAILED,
    ATOMIC_INTENT,
    CAS_FAIL,
    CAS_OK,
    FADD,
    WRITE,
    WRITE_FAILED,
    WRITE_INTENT,
    WRITER_AGENT,
    record,
    stamp,
)

__all__ = ["LoggedDma", "nothing_copied"]

#: Refusals that prove an 8-byte, one-page WRITE or atomic changed nothing (``stamps``).
_NOTHING_COPIED = frozenset((errno.EPERM, errno.EFAULT, errno.EINVAL, errno.ENOENT, errno.EACCES))


def nothing_copied(exc: BaseException) -> bool:
    """Whether ``exc`` proves the write it ended was refused before anything landed: one of
    the errnos above, or an EBUSY the client raised itself (every attempt refused STALE).
    hmmd's own EBUSY (a RemoteError) may be a copy past its deadline that still lands."""
    if not isinstance(exc, DeviceError):
        return False
    if exc.errno in _NOTHING_COPIED:
        return True
    return exc.errno == errno.EBUSY and not isinstance(exc, RemoteError)


class LoggedDma:
    """The agent's logged WRITE and atomics (``check.agent.Agent`` sets these attributes)."""

    nic: Nic
    index: int
    rng: random.Random
    log: IO[bytes]
    buf: bytearray
    version: int
    stats: dict[str, Any]
    lie_atomics: bool
    lie_writes: bool
    atomic_seq: int
    guess: dict[int, int]

    async def _write(self, mr: MemoryRegion, addr: int, page: int, t0: int) -> None:
        """WRITE a fresh stamp over the page's first 8 bytes (the atomic word and the zero
        tail are left alone); log its intent first, then what became of it."""
        self.version += 1
        value = stamp(WRITER_AGENT + self.index, 0, page, self.version)
        # Unbuffered, before the write leaves: a SIGKILL from here on loses the
        # outcome, not the fact that this value may land.
        self.log.write(record(t0, t0, addr, WRITE_INTENT, value))
        try:
            await self.nic.write(mr.rkey, addr, value.to_bytes(8, "little"))
        except Exception as exc:
            if nothing_copied(exc):
                # --lie-writes: the planted fault, a refused write logged as landed.
                kind = WRITE if self.lie_writes else WRITE_FAILED
                self.buf += record(t0, time.monotonic_ns(), addr, kind, value)
                self.stats["lies"] += self.lie_writes
            # Else (a timeout, hmmd's own EBUSY, ...) the intent stays unresolved: hmmd
            # may still perform the write, so its value stays possible from t0 on.
            raise
        self.buf += record(t0, time.monotonic_ns(), addr, WRITE, value)
        self.stats["writes"] += 1

    async def _atomic(self, mr: MemoryRegion, addr: int, t0: int, fadd: bool) -> None:
        """FETCH_ADD 1, or COMPARE_SWAP v for v + 1 (v: what we last saw there), on the
        page's word at offset 8; logged like a write (``check.atomics`` judges them)."""
        self.atomic_seq += 1
        token = self.index << 48 | self.atomic_seq
        self.log.write(record(t0, t0, addr, ATOMIC_INTENT, 0, token))
        guess = self.guess.get(addr, 0)
        try:
            if fadd:
                old = await self.nic.atomic(mr.rkey, addr + 8, AtomicOp.FETCH_ADD, 1)
            else:
                old = await self.nic.atomic(mr.rkey, addr + 8, AtomicOp.CMP_SWAP, guess, guess + 1)
        except Exception as exc:
            if nothing_copied(exc):
                self.buf += record(t0, time.monotonic_ns(), addr, ATOMIC_FAILED, 0, token)
            raise
        t1 = time.monotonic_ns()
        kind = FADD if fadd else CAS_OK if old == guess else CAS_FAIL
        self.guess[addr] = old + (kind != CAS_FAIL)
        logged = old
        if self.lie_atomics and kind == FADD and self.rng.random() < 0.5:
            # The planted fault: the device returned the neighbour's value.
            logged = old + 1 if old == 0 or self.rng.random() < 0.5 else old - 1
            self.stats["lies"] += 1
        self.buf += record(t0, t1, addr, kind, logged, token)
        self.stats["atomics"] += 1
