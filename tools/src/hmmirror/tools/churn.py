"""The demo's target process: keeps mapping, writing, mprotecting, madvising and unmapping.

It reserves an arena of ``SLOTS`` slots of ``SLOT_PAGES`` pages, prints the
arena's address on stdout, then churns seeded random operations on the slots
until killed. Every operation is a real syscall on its own memory.
"""

from __future__ import annotations

import ctypes
import random
import sys
import time

from hmmirror.tools.syscalls import (
    MADV_DONTNEED,
    MADV_FREE,
    MAP_ANONYMOUS,
    MAP_FAILED,
    MAP_FIXED_NOREPLACE,
    MAP_PRIVATE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    check,
    libc,
)

SLOTS = 32
SLOT_PAGES = 16
PAGE = 4096
ARENA = SLOTS * SLOT_PAGES * PAGE


def mmap_at(addr: int, length: int, prot: int) -> bool:
    """Map fresh anonymous memory exactly at ``addr``; False if something else took the hole."""
    got = libc.mmap(addr, length, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    if got is None or got == MAP_FAILED or got != addr:
        if got not in (None, MAP_FAILED):
            libc.munmap(got, length)
        return False
    return True


def run(seed: int, ops_per_s: float) -> None:
    """Churn forever (the demo kills us)."""
    rng = random.Random(seed)
    base = libc.mmap(None, ARENA, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if base in (None, MAP_FAILED):
        raise OSError(ctypes.get_errno(), "mmap arena")
    state = ["none"] * SLOTS  # none (PROT_NONE reservation), rw, ro, gone (munmapped)
    print(f"{base:#x} {ARENA}", flush=True)
    version = 0
    pause = 1.0 / ops_per_s
    while True:
        slot = rng.randrange(SLOTS)
        addr = base + slot * SLOT_PAGES * PAGE
        length = SLOT_PAGES * PAGE
        st = state[slot]
        if st in ("none", "gone"):
            if st == "none":
                check(libc.munmap(addr, length), "munmap reservation")
            if mmap_at(addr, length, PROT_READ | PROT_WRITE):
                state[slot] = "rw"
                for page in range(0, SLOT_PAGES, 2):
                    version += 1
                    ctypes.memmove(addr + page * PAGE, version.to_bytes(8, "little"), 8)
            else:
                state[slot] = "gone"
        else:
            op = rng.random()
            if op < 0.45 and st == "rw":
                version += 1
                page = rng.randrange(SLOT_PAGES)
                ctypes.memmove(
                    addr + page * PAGE + 8 * rng.randrange(8), version.to_bytes(8, "little"), 8
                )
            elif op < 0.6:
                check(libc.mprotect(addr, length, PROT_READ), "mprotect ro")
                state[slot] = "ro"
            elif op < 0.7:
                check(libc.mprotect(addr, length, PROT_READ | PROT_WRITE), "mprotect rw")
                state[slot] = "rw"
            elif op < 0.8:
                check(libc.madvise(addr, length, MADV_DONTNEED), "madvise dontneed")
            elif op < 0.85 and st == "rw":
                check(libc.madvise(addr, length, MADV_FREE), "madvise free")
            elif op < 0.95:
                check(libc.munmap(addr, length), "munmap")
                state[slot] = "gone"
        time.sleep(pause)


if __name__ == "__main__":
    run(
        int(sys.argv[1]) if len(sys.argv) > 1 else 1,
        float(sys.argv[2]) if len(sys.argv) > 2 else 2000.0,
    )
