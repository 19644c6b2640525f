"""The processes of benchmarks 6 and 7 (``bench_soak``, ``bench_scaling``): the churning target
and the agents.

``python bench/soak_procs.py target ENDPOINT PAGES THREADS SEED`` is a target: one
anonymous arena cut into slots, its userfaultfd handed to hmmd, paced invalidating operations
on ``THREADS`` threads (see ``bench_soak``'s docstring for the mix). ``python
bench/soak_procs.py agent ...`` is one client-library agent mirroring the whole arena of every
target it is given (one mirror each), faulting runs of them and running the translation oracle
over every mirror when asked (``check`` on stdin). ``soak_rig.Rig`` starts both kinds.

ENDPOINTS is one hmmd's endpoint or several, comma-separated (hmmd instances whose sockets
share a directory, SPEC.md §1.7). A target is given the one it exposes its userfaultfd to
(the rig gives target j instance j mod D), which owns it from then on; an agent opens a
``SessionGroup`` with all of them, which finds each target's owner (following MOVED).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import random
import select
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HELPER_MAX_S, PAGE, StdinLines, agent_args, run_modes
from hmmirror.tools.syscalls import (
    MADV_DONTNEED,
    MADV_NOHUGEPAGE,
    MAP_ANONYMOUS,
    MAP_FIXED_NOREPLACE,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    libc,
)
from soak_rig import SLOT_PAGES

FAULT_RUN_PAGES = 64

# --------------------------------------------------------------------------- target process


def _churn(
    libc: Any,
    base: int,
    slots: list[int],
    rate: float,
    seed: int,
    stop: threading.Event,
    counts: dict[str, int],
) -> None:
    """One target thread: paced invalidating operations on its own ``slots``."""
    rng = random.Random(seed)
    state = dict.fromkeys(slots, "rw")
    slot_len = SLOT_PAGES * PAGE
    stamp = ctypes.c_uint64(0)
    pc = time.monotonic
    t0 = pc()
    done = 0  # operations the schedule has consumed (done or skipped)
    lag = 0.05 * rate  # more than 50 ms behind: skip ahead instead of bursting

    def write(slot: int, npages: int) -> None:
        addr = base + slot * slot_len
        for _ in range(npages):
            stamp.value += 1
            ctypes.memmove(addr + rng.randrange(SLOT_PAGES) * PAGE, ctypes.byref(stamp), 8)
        counts["writes"] += npages

    while not stop.is_set():
        due = (pc() - t0) * rate - done
        if due < 1:
            time.sleep(min(0.01, (1 - due) / rate))
            continue
        if due > lag:
            skip = int(due - 1)
            done += skip
            counts["skipped"] += skip
        slot = rng.choice(slots)
        addr = base + slot * slot_len
        done += 1
        if rng.random() < 0.04:
            libc.munmap(addr, slot_len)
            got = libc.mmap(
                addr,
                slot_len,
                PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
            if got != addr:
                raise OSError(ctypes.get_errno(), f"mmap of slot {slot} at {addr:#x} got {got}")
            libc.madvise(addr, slot_len, MADV_NOHUGEPAGE)
            state[slot] = "rw"
            counts["munmap"] += 1
            write(slot, SLOT_PAGES // 2)
        else:
            first = rng.randrange(SLOT_PAGES)
            n = min(rng.randint(1, 4), SLOT_PAGES - first)
            libc.madvise(addr + first * PAGE, n * PAGE, MADV_DONTNEED)
            counts["dontneed"] += 1
        rw = [s for s in (rng.choice(slots), rng.choice(slots)) if state[s] == "rw"]
        for s in rw:
            write(s, 1)
        if done % 50 == 0:  # flip one slot's protection (the proc watcher's business)
            s = rng.choice(slots)
            prot = PROT_READ if state[s] == "rw" else PROT_READ | PROT_WRITE
            libc.mprotect(base + s * slot_len, slot_len, prot)
            state[s] = "ro" if prot == PROT_READ else "rw"
            counts["mprotect"] += 1
        counts["ops"] += 1


def target_main(argv: list[str]) -> int:
    """``target ENDPOINT PAGES THREADS SEED``, then ``go RATE MAX_SECONDS`` and ``stop`` lines.
    ENDPOINT is the hmmd the target's userfaultfd goes to, which owns it from then on."""
    endpoint, pages, threads, seed = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    from hmmirror.client.target import expose

    length = pages * PAGE
    base = libc.mmap(
        None, length + SLOT_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0
    )
    if base in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap arena")
    # Slot-aligned, so a slot never straddles something else; the spare tail goes back.
    aligned = (base + SLOT_PAGES * PAGE - 1) & ~(SLOT_PAGES * PAGE - 1)
    if aligned > base:
        libc.munmap(base, aligned - base)
    tail = aligned + length
    if base + length + SLOT_PAGES * PAGE > tail:
        libc.munmap(tail, base + length + SLOT_PAGES * PAGE - tail)
    base = aligned
    libc.madvise(base, length, MADV_NOHUGEPAGE)  # 4 KiB pages: DONTNEED of one page is one page
    ctypes.memset(base, 1, length)
    expose(endpoint)
    print(f"target ready {base:#x} {length}", flush=True)
    cmd = sys.stdin.readline().split()
    if not cmd or cmd[0] != "go":
        return 0
    rate, max_s = float(cmd[1]), float(cmd[2])
    nslots = pages // SLOT_PAGES
    stop = threading.Event()
    counts = [
        dict.fromkeys(("ops", "dontneed", "munmap", "mprotect", "writes", "skipped"), 0)
        for _ in range(threads)
    ]
    workers = [
        threading.Thread(
            target=_churn,
            args=(
                libc,
                base,
                list(range(i, nslots, threads)),
                rate / threads,
                seed + i,
                stop,
                counts[i],
            ),
            daemon=True,
        )
        for i in range(threads)
    ]
    for w in workers:
        w.start()
    deadline = time.monotonic() + min(max_s, HELPER_MAX_S)
    while time.monotonic() < deadline and all(w.is_alive() for w in workers):
        r, _, _ = select.select([0], [], [], 0.2)
        if r:
            line = os.read(0, 4096)
            if not line or b"stop" in line:
                break
        if os.getppid() == 1:
            break
    stop.set()
    for w in workers:
        w.join(5.0)
    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    print("target done " + json.dumps(total), flush=True)
    with contextlib.suppress(OSError):
        select.select([0], [], [], 10.0)
    return 0


# --------------------------------------------------------------------------- agent process


async def _agent(
    endpoints: list[str],
    name: str,
    ranges: list[tuple[int, int, int]],
    fault_hz: float,
    seed: int,
) -> None:
    import numpy as np
    from hmmirror.client import Access, connect_group
    from hmmirror.client.errors import AgentError
    from hmmirror.proto.entries import HMM_PFN_VALID
    from hmmirror.proto.messages import FaultMode
    from hmmirror.tools.oracle import check

    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    # One hmmd is a group of one: its mirror calls are the session's own.
    async with connect_group(endpoints, name=name, timeout=10.0) as group:
        mirrors = []
        got = 0
        for pid, start, length in ranges:  # one mirror per target: a device mirroring many mms
            mirror = await group.mirror(pid, start, length, Access.READ | Access.WRITE)
            got += await mirror.populate(start, mirror.npages, False, FaultMode.PRESENT)
            mirrors.append(mirror)
        ids = ",".join(str(m.id) for m in mirrors)
        print(f"agent ready {name} mirrors={ids} valid={got}", flush=True)
        faults = errors = 0
        last_error = ""
        paused = asyncio.Event()
        idle = asyncio.Event()
        idle.set()
        stdin = StdinLines(loop)  # "check" lines; closed when the bench is done

        async def fault_loop() -> None:
            nonlocal faults, errors, last_error
            period = 1.0 / fault_hz if fault_hz > 0 else 0.0
            next_t = loop.time()
            while period and not stdin.closed.is_set():
                next_t += period
                await asyncio.sleep(max(0.0, next_t - loop.time()))
                if loop.time() - next_t > 1.0:
                    next_t = loop.time()  # stopped or starved: do not burst
                if paused.is_set():
                    continue
                mirror = rng.choice(mirrors)  # the same fault load however many targets
                first = rng.randrange(0, mirror.npages - FAULT_RUN_PAGES + 1)
                idle.clear()
                try:
                    await mirror.populate(
                        mirror.start + first * PAGE, FAULT_RUN_PAGES, False, FaultMode.PRESENT
                    )
                    faults += 1
                except AgentError as exc:  # EBUSY under heavy churn is allowed; count it
                    errors += 1
                    last_error = repr(exc)[:160]
                finally:
                    idle.set()

        task = asyncio.ensure_future(fault_loop())
        deadline = loop.time() + HELPER_MAX_S
        try:
            while loop.time() < deadline:
                try:
                    line = await asyncio.wait_for(stdin.lines.get(), deadline - loop.time())
                except TimeoutError:
                    break
                if line == "":
                    break
                if line == "check":
                    paused.set()
                    await idle.wait()  # a fault in flight finishes first
                    t0 = time.perf_counter()
                    held = sum(
                        int(np.count_nonzero(m.table & np.uint64(HMM_PFN_VALID))) for m in mirrors
                    )
                    found = [v for m in mirrors for v in check(m)]
                    ms = (time.perf_counter() - t0) * 1e3
                    first_v = repr(found[0])[:200] if found else ""
                    print(f"checked {held} {len(found)} {ms:.1f} {first_v}", flush=True)
                    paused.clear()
        finally:
            stdin.closed.set()
            task.cancel()
            # Not suppress(BaseException): that would swallow a cancellation of this agent too.
            await asyncio.wait((task,))
        stats = {
            "counters": {k: sum(m.counters[k] for m in mirrors) for k in mirrors[0].counters},
            "retries": sum(m.retries for m in mirrors),
            "invalidate_msgs": sum(s.invalidations_received for s in group.sessions),
            "faults": faults,
            "fault_errors": errors,
            "last_error": last_error,
            "dropped": next((m.dropped for m in mirrors if m.dropped is not None), None),
        }
        stats["moves"] = group.moves  # MOVED answers its mirror calls followed
        print("agent stats " + json.dumps(stats), flush=True)
        for m in mirrors:
            await m.close()


def agent_main(argv: list[str]) -> int:
    """``agent ENDPOINTS NAME PID START LENGTH FAULT_HZ SEED [PID START LENGTH]...``: the first
    target's range, then those of the other targets this agent mirrors too; ENDPOINTS one
    hmmd's, or several comma-separated (a ``SessionGroup`` with all)."""
    import baseline_fanout

    endpoint, name, pid, start, length = agent_args(argv)
    fault_hz, seed = float(argv[5]), int(argv[6])
    more = argv[7:]
    if len(more) % 3:
        raise SystemExit(f"agent: extra targets come as PID START LENGTH triples, got {more}")
    ranges = [(pid, start, length)] + [
        (int(more[i]), int(more[i + 1], 0), int(more[i + 2])) for i in range(0, len(more), 3)
    ]
    endpoints = endpoint.split(",")
    baseline_fanout.pick_runner("uvloop")(_agent(endpoints, name, ranges, fault_hz, seed))
    return 0


if __name__ == "__main__":
    run_modes({"target": target_main, "agent": agent_main}, "python -m bench --only soak")
