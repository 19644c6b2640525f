"""Benchmark 3: fault-in of a populated range (default 1 GiB) into an agent's device table.

Target: a child process that mmaps the range and writes every 4 KiB page.
Baseline: ``os.preadv`` of ``/proc/PID/pagemap`` for the same range into a numpy u64 array
(the raw data the daemon has to read anyway; nothing decoded).
Ours: a real ``hmmd`` and an agent session in this process; each run times
``await mirror.fault(start, npages)`` on a fresh mirror ("fresh"), and separately on one mirror
right after ``sync_range`` invalidated the whole range ("after-inval").
Ratio = baseline_time / our_time (a speed ratio; 1.0 = as fast as the raw read).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baseline_fanout
from common import PAGE, Procs, Row, settle, spawn_target, start_daemon, tmpdir, verdict

VALID = np.uint64(1 << 63)


def pagemap_read(pid: int, addr: int, npages: int, runs: int) -> tuple[list[float], np.ndarray]:
    """Time ``runs`` full reads of the range's pagemap entries (after one untimed read)."""
    arr = np.empty(npages, dtype=np.uint64)
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    times: list[float] = []
    try:
        off0 = (addr // PAGE) * 8
        nbytes = npages * 8
        mv = memoryview(arr).cast("B")
        for i in range(runs + 1):
            t0 = time.perf_counter()
            got = 0
            while got < nbytes:
                k = os.preadv(fd, [mv[got:]], off0 + got)
                if k <= 0:
                    raise OSError(f"short pagemap read at {got}/{nbytes}")
                got += k
            dt = time.perf_counter() - t0
            if i:
                times.append(dt)
    finally:
        os.close(fd)
    return times, arr


async def _ours(
    endpoint: str, pid: int, addr: int, npages: int, runs: int, base: list[float]
) -> dict[str, Any]:
    """Time our fault-ins. Before each timed run one baseline read is timed too (into ``base``),
    so both sides see the same machine conditions."""
    from hmmirror.client import Access, connect

    def base_sample() -> None:
        base.extend(pagemap_read(pid, addr, npages, 1)[0])

    fresh: list[float] = []
    after: list[float] = []
    info: dict[str, Any] = {}
    pc = time.perf_counter
    async with connect(endpoint, name="bench-fault") as s:
        # fresh mirror each run (plus one untimed warm-up run)
        for i in range(runs + 1):
            if i:
                base_sample()
            m = await s.mirror(pid, addr, npages * PAGE, Access.READ | Access.WRITE)
            t0 = pc()
            got = await m.fault(addr, npages)
            dt = pc() - t0
            valid = int(np.count_nonzero(m.table & VALID))
            if i == 0:
                info.update(first_s=dt, got=got, valid=valid, retries=m.retries)
            else:
                fresh.append(dt)
            if valid != npages:
                info.setdefault("problems", []).append(
                    f"fresh run {i}: {valid}/{npages} VALID entries"
                )
            await m.close()
        # one mirror, whole range invalidated before each timed fault
        m = await s.mirror(pid, addr, npages * PAGE, Access.READ | Access.WRITE)
        await m.fault(addr, npages)
        for i in range(runs):
            await s.sync_range(pid, addr, addr + npages * PAGE)
            left = int(np.count_nonzero(m.table & VALID))
            if left:
                info.setdefault("problems", []).append(
                    f"after sync_range {i}: {left} entries still VALID"
                )
            base_sample()
            t0 = pc()
            await m.fault(addr, npages)
            after.append(pc() - t0)
            valid = int(np.count_nonzero(m.table & VALID))
            if valid != npages:
                info.setdefault("problems", []).append(
                    f"after-inval run {i}: {valid}/{npages} VALID"
                )
        info["table_sample"] = [hex(int(x)) for x in m.table[:2]]
        info["retries_after"] = m.retries
        await m.close()
        info["status"] = await s.status()
    info.update(fresh=fresh, after=after)
    return info


def bench_fault(
    size: int, runs: int, loop: str, daemon_args: list[str], log: Any = print
) -> list[Row]:
    npages = size // PAGE
    label = f"{size / 2**30:g} GiB" if size >= 2**30 else f"{size / 2**20:g} MiB"
    rows: list[Row] = []
    with tmpdir() as d, Procs() as procs:
        t0 = time.perf_counter()
        target = spawn_target(procs, size, populate=True, timeout=120.0)
        log(
            f"[fault {label}] target pid {target.pid} populated {npages} pages in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        settle(log)
        btimes, arr = pagemap_read(target.pid, target.addr, npages, runs)
        present = int(np.count_nonzero(arr & VALID))
        bbest, bmed = min(btimes), statistics.median(btimes)
        log(
            f"[fault {label}] baseline pagemap preadv: best {bbest * 1e3:.2f} ms, "
            f"median {bmed * 1e3:.2f} ms "
            f"({present}/{npages} present; {size / bbest / 1e9:.0f} GB of VA/s)"
        )
        try:
            dmn = start_daemon(procs, f"ipc://{d}/hmmd.sock", d, daemon_args)
            settle(log)
            r = baseline_fanout.run_bounded(
                loop,
                _ours(dmn.endpoint, target.pid, target.addr, npages, runs, btimes),
                baseline_fanout.LIMIT_S,
            )
        except Exception as exc:
            log(f"[fault {label}] hmmirror side failed: {exc!r}")
            if "dmn" in locals() and dmn.problems():
                log(f"[hmmd log] {dmn.problems()}")
            return [
                Row(
                    f"fault {label} (fresh mirror, best)",
                    "ERROR",
                    f"{bbest * 1e3:.2f} ms",
                    None,
                    ">= 0.5",
                    "ERROR",
                    repr(exc)[:300],
                )
            ]
        procs.stop(dmn.proc)
        if dmn.problems():
            log(f"[hmmd log] {dmn.problems()}")
    # baseline over all its samples: the up-front ones plus one interleaved before each of ours
    bbest, bmed = min(btimes), statistics.median(btimes)
    log(
        f"[fault {label}] baseline over {len(btimes)} reads (interleaved with ours): "
        f"best {bbest * 1e3:.2f} ms, median {bmed * 1e3:.2f} ms"
    )
    fbest, fmed = min(r["fresh"]), statistics.median(r["fresh"])
    abest, amed = min(r["after"]), statistics.median(r["after"])
    note = (
        f"first (untimed) fault {r['first_s'] * 1e3:.1f} ms returned {r['got']}, "
        f"{r['valid']} VALID; "
        f"retries {r['retries']}/{r['retries_after']}; daemon faults={r['status'].get('faults')}"
        + (f"; PROBLEMS: {r['problems'][:4]}" if r.get("problems") else "")
    )
    log(
        f"[fault {label}] hmmirror mirror.fault: fresh best {fbest * 1e3:.2f} ms, "
        f"median {fmed * 1e3:.2f} ms; "
        f"after-inval best {abest * 1e3:.2f} ms, median {amed * 1e3:.2f} ms; {note}"
    )
    for what, ours, base in (
        ("fresh mirror, best", fbest, bbest),
        ("fresh mirror, median", fmed, bmed),
        ("after sync_range, best", abest, bbest),
        ("after sync_range, median", amed, bmed),
    ):
        ratio = base / ours
        rows.append(
            Row(
                f"fault {label} ({what})",
                f"{ours * 1e3:.2f} ms",
                f"{base * 1e3:.2f} ms",
                ratio,
                ">= 0.5",
                verdict(ratio, ">=", 0.5),
                note if what == "fresh mirror, best" else "",
            )
        )
    return rows
