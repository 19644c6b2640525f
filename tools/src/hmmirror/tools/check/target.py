"""The checked target: a seeded random workload on a stamped arena, logging every change.

``python -m hmmirror.tools.check.target SEED LOG`` reserves an arena of
``SLOTS`` slots of ``SLOT_PAGES`` pages (PROT_NONE), prints ``ready BASE SIZE``
and then obeys one command per line on stdin:

- ``run K``: perform K random operations, then print ``done K``;
- ``exit``: flush the log and exit.

SIGUSR1 makes it exit at the next operation boundary, even mid-``run``: the
agents are then mid-fault and mid-DMA, which is the point.

Operations are real system calls on the arena: mmap, MAP_FIXED over a mapping,
munmap, mprotect, madvise(DONTNEED) and madvise(FREE), mremap to another slot,
fork (the child writes its own copies, the parent writes too), and plain
stores of stamps. Each change is logged with CLOCK_MONOTONIC times taken just
before and just after it (``stamps.TARGET_LOG`` records), so the data oracle
knows which values every page may have held, and when.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import sys
import time

from hmmirror.tools.check.stamps import (
    FREE,
    HOLE,
    MOVE,
    PAGE,
    SET,
    UNMAPPED,
    WRITER_CHILD,
    WRITER_TARGET,
    ZERO,
    record,
    stamp,
)
from hmmirror.tools.syscalls import (
    MADV_DONTNEED,
    MADV_FREE,
    MAP_ANONYMOUS,
    MAP_FAILED,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_PRIVATE,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    check,
    libc,
)

SLOTS = 16
SLOT_PAGES = 16
SLOT = SLOT_PAGES * PAGE
ARENA = SLOTS * SLOT


class CheckTarget:
    """The arena, each slot's state, and the change log being built."""

    def __init__(self, seed: int, log_path: str) -> None:
        self.rng = random.Random(seed)
        base = libc.mmap(None, ARENA, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if base in (None, MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap arena")
        self.base: int = base
        #: "none" (ours, PROT_NONE), "gone" (munmapped: anyone may take the hole), "rw", "ro".
        self.state = ["none"] * SLOTS
        self.gen = [0] * SLOTS
        self.version = 0
        self.generation = 0
        self.log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - lives as long as we do
        self.buf = bytearray()
        self.ops: dict[str, int] = {}
        self.children: set[int] = set()
        #: Set by SIGUSR1: exit at the next operation boundary (the log then stays exact).
        self.leaving = False

    # --- logging ---------------------------------------------------------------------------------

    def _log(self, t0: int, t1: int, addr: int, kind: int, value: int, extra: int = 0) -> None:
        self.buf += record(t0, t1, addr, kind, value, extra)

    def _log_slot(self, t0: int, t1: int, slot: int, value: int, extra: int = 0) -> None:
        for p in range(SLOT_PAGES):
            self._log(t0, t1, self.addr(slot, p), SET, value, extra)

    def flush(self) -> None:
        """Write the buffered records to the log file."""
        if self.buf:
            self.log.write(self.buf)
            self.buf = bytearray()

    def addr(self, slot: int, page: int = 0) -> int:
        """Address of ``page`` of ``slot``."""
        return self.base + slot * SLOT + page * PAGE

    # --- operations ------------------------------------------------------------------------------

    def _store(self, slot: int, page: int) -> None:
        """A plain CPU store of a fresh stamp into the page's first word."""
        self.version += 1
        value = stamp(WRITER_TARGET, self.gen[slot], slot * SLOT_PAGES + page, self.version)
        addr = self.addr(slot, page)
        t0 = time.monotonic_ns()
        ctypes.c_uint64.from_address(addr).value = value  # one aligned 8-byte store
        self._log(t0, time.monotonic_ns(), addr, SET, value)

    def _map(self, slot: int, flags: int, prot: int = PROT_READ | PROT_WRITE) -> bool:
        """mmap fresh anonymous memory at the slot (``flags``: FIXED or FIXED_NOREPLACE)."""
        addr = self.addr(slot)
        t0 = time.monotonic_ns()
        got = libc.mmap(addr, SLOT, prot, MAP_PRIVATE | MAP_ANONYMOUS | flags, -1, 0)
        t1 = time.monotonic_ns()
        if got != addr:
            if got not in (None, MAP_FAILED):
                libc.munmap(got, SLOT)
            return False
        if prot == PROT_NONE:
            self._log_slot(t0, t1, slot, UNMAPPED)
            self.state[slot] = "none"
            return True
        self.generation += 1
        self.gen[slot] = self.generation
        self._log_slot(t0, t1, slot, ZERO)
        self.state[slot] = "rw"
        return True

    def step(self) -> str:
        """One random operation; return its name."""
        rng = self.rng
        self._reap()
        slot = rng.randrange(SLOTS)
        st = self.state[slot]
        if st == "none":
            # MAP_FIXED over our own PROT_NONE reservation: atomically replaced.
            self._map(slot, MAP_FIXED)
            for p in range(0, SLOT_PAGES, 2):
                self._store(slot, p)
            return "mmap"
        if st == "gone":
            if self._map(slot, MAP_FIXED_NOREPLACE):
                return "mmap"
            return "mmap-taken"
        op = rng.random()
        if op < 0.40:
            if st != "rw":
                return self._mprotect(slot, PROT_READ | PROT_WRITE)
            for _ in range(rng.randint(1, 4)):
                self._store(slot, rng.randrange(SLOT_PAGES))
            return "write"
        if op < 0.50:
            return self._mprotect(slot, PROT_READ)
        if op < 0.58:
            return self._madvise(slot, MADV_DONTNEED)
        if op < 0.64 and st == "rw":
            return self._madvise(slot, MADV_FREE)
        if op < 0.70:
            t0 = time.monotonic_ns()
            check(libc.munmap(self.addr(slot), SLOT), "munmap")
            # A hole: the process's own next mapping may take it (HOLE, stamps.py).
            self._log_slot(t0, time.monotonic_ns(), slot, UNMAPPED, HOLE)
            self.state[slot] = "gone"
            return "munmap"
        if op < 0.77:
            self._map(slot, MAP_FIXED)
            return "map-fixed-over"
        if op < 0.80:
            self._map(slot, MAP_FIXED, PROT_NONE)
            return "map-none-over"
        if op < 0.90:
            return self._mremap(slot)
        if op < 0.95 and st == "rw":
            return self._fork(slot)
        return "nop"

    def _mprotect(self, slot: int, prot: int) -> str:
        check(libc.mprotect(self.addr(slot), SLOT, prot), "mprotect")
        self.state[slot] = "rw" if prot & PROT_WRITE else "ro"
        return "mprotect"

    def _madvise(self, slot: int, advice: int) -> str:
        t0 = time.monotonic_ns()
        check(libc.madvise(self.addr(slot), SLOT, advice), "madvise")
        t1 = time.monotonic_ns()
        if advice == MADV_DONTNEED:
            self._log_slot(t0, t1, slot, ZERO)
            return "madvise-dontneed"
        for p in range(SLOT_PAGES):
            self._log(t0, t1, self.addr(slot, p), FREE, 0)
        return "madvise-free"

    def _mremap(self, src: int) -> str:
        """Move the slot's pages onto one of our PROT_NONE slots (which MREMAP_FIXED replaces)."""
        free = [s for s in range(SLOTS) if self.state[s] == "none"]
        if not free:
            return "nop"
        dst = self.rng.choice(free)
        t0 = time.monotonic_ns()
        got = libc.mremap(self.addr(src), SLOT, SLOT, MREMAP_MAYMOVE | MREMAP_FIXED, self.addr(dst))
        t1 = time.monotonic_ns()
        if got != self.addr(dst):
            raise OSError(ctypes.get_errno(), "mremap")
        for p in range(SLOT_PAGES):
            self._log(t0, t1, self.addr(dst, p), MOVE, 0, self.addr(src, p))
        self._log_slot(t0, t1, src, UNMAPPED)
        self.state[dst], self.state[src] = self.state[src], "gone"
        self.gen[dst] = self.gen[src]
        # Take the hole back at once when we can: the slot is ours again, PROT_NONE.
        self._map(src, MAP_FIXED_NOREPLACE, PROT_NONE)
        return "mremap"

    def _fork(self, slot: int) -> str:
        """fork: the child stamps its own copies (never the parent's), the parent writes too."""
        self.flush()
        pid = os.fork()
        if pid == 0:
            try:
                rng = random.Random(self.version)
                for i in range(4):
                    p = rng.randrange(SLOT_PAGES)
                    v = stamp(WRITER_CHILD, self.gen[slot], slot * SLOT_PAGES + p, i + 1)
                    ctypes.c_uint64.from_address(self.addr(slot, p)).value = v
                time.sleep(0.005)
            finally:
                os._exit(0)
        self.children.add(pid)
        for _ in range(3):
            self._store(slot, self.rng.randrange(SLOT_PAGES))
        return "fork"

    def _reap(self) -> None:
        for pid in list(self.children):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                self.children.discard(pid)

    def run(self, count: int) -> None:
        """``count`` operations, paced so agents get a word in between."""
        for _ in range(count):
            if self.leaving:
                self.flush()
                os._exit(0)
            name = self.step()
            self.ops[name] = self.ops.get(name, 0) + 1
            time.sleep(0.0005)
        self.flush()


def main(argv: list[str]) -> int:
    """Serve ``run K`` / ``exit`` commands on stdin."""
    seed, log_path = int(argv[0]), argv[1]
    target = CheckTarget(seed, log_path)

    def leave(signum: int, frame: object) -> None:
        target.leaving = True

    signal.signal(signal.SIGUSR1, leave)
    print(f"ready {target.base:#x} {ARENA}", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "exit":
            break
        if words[0] == "run":
            target.run(int(words[1]))
            ops = " ".join(f"{k}={v}" for k, v in sorted(target.ops.items()))
            print(f"done {words[1]} {ops}", flush=True)
    target.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
