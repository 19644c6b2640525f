"""Benchmark 5: synchronous watching. munmap-to-acked latency by watcher, written-scan cost.

* **munmap → all acked**: a target process munmaps one mirrored page at a time
  and stamps CLOCK_MONOTONIC before the call and after it returns; hmmd stamps
  (``last_acked_monotonic`` in its status) the moment the invalidation had
  every ack. The agent, in this process, also stamps the INVALIDATE's arrival. Run against hmmd
  with the uffd watcher (the target exposes its userfaultfd) and against hmmd
  with ``--uffd off`` (proc watcher only). The
  target for uffd mode: latency p50 <= munmap's own p50 with uffd (the uffd
  event round trip) + 1.3 x hmmd's invalidation round trip p50 (``ack_p50_us``).
* **store cost**: the target times its first store to each of N pages that a
  mirror holds, unwatched, under WP_ASYNC written tracking, and under strict
  (synchronous) write-protection, where each store waits for the agent's ack.
* **written scan**: PAGEMAP_SCAN get-and-clear of PAGE_IS_WRITTEN (hmmd's own
  ``scan.written``) over 1 GiB registered with a WP_ASYNC userfaultfd, after
  0% and after 1% of its pages were written; ms per GiB.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baseline_fanout
from common import PAGE, PY, Procs, Row, percentile, read_line, settle, start_daemon, tmpdir

TARGET = r"""
import ctypes, mmap, os, random, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
mode, n = sys.argv[1], int(sys.argv[2])
addr = libc.mmap(None, n * 4096, 3, 0x22, -1, 0)
ctypes.memset(addr, 1, n * 4096)
if mode in ("expose", "expose2"):
    from hmmirror.client.target import expose
    expose(sys.argv[3])
    if mode == "expose2":
        expose(sys.argv[3], strict=True)
elif mode == "leave":
    fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)
    print("uffd", fd, flush=True)
print("ready", addr, flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "unmap":
        page = addr + int(cmd[1]) * 4096
        t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
        libc.munmap(ctypes.c_void_p(page), 4096)
        t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
        print("done", t0, t1, flush=True)
    elif cmd[0] == "touch":  # one timed store into each of the first n pages
        buf = (ctypes.c_char * (n * 4096)).from_address(addr)
        times = []
        for p in range(int(cmd[1])):
            t0 = time.perf_counter_ns()
            buf[p * 4096 + 1] = b"t"
            times.append(time.perf_counter_ns() - t0)
        times.sort()
        print("done", times[len(times) // 2], times[len(times) * 99 // 100], flush=True)
    elif cmd[0] == "write":
        rng = random.Random(int(cmd[2]))
        buf = (ctypes.c_char * (n * 4096)).from_address(addr)
        for p in rng.sample(range(n), int(cmd[1])):
            buf[p * 4096] = b"w"
        print("done", flush=True)
"""


async def _munmap_run(endpoint: str, target: Any, addr: int, count: int) -> dict[str, Any]:
    """Mirror ``count`` pages, munmap them one by one; gather both ends' stamps."""
    from hmmirror.client import Access, connect, status

    arrived: dict[int, float] = {}
    lat: list[float] = []
    acked: list[float] = []
    syscall: list[float] = []
    async with connect(endpoint, name="bench-uffd") as s:
        mirror = await s.mirror(target.pid, addr, count * PAGE, Access.READ)
        await mirror.fault(addr, count)
        original = mirror._invalidate

        def stamp(seq: int, start: int, end: int, event: Any) -> Any:
            arrived.setdefault((start - addr) // PAGE, time.clock_gettime(time.CLOCK_MONOTONIC))
            return original(seq, start, end, event)

        mirror._invalidate = stamp  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        for i in range(count):
            target.stdin.write(f"unmap {i}\n".encode())
            target.stdin.flush()
            line = await loop.run_in_executor(None, target.stdout.readline)
            _, t0, t1 = line.split()
            deadline = time.monotonic() + 5
            while i not in arrived and time.monotonic() < deadline:
                await asyncio.sleep(0.0002)
            if i in arrived:
                lat.append(arrived[i] - float(t0))
                # When hmmd had every ack (CLOCK_MONOTONIC, as the target's stamps).
                while time.monotonic() < deadline:
                    done = float((await status(endpoint))["last_acked_monotonic"])
                    if done >= arrived[i]:
                        acked.append(done - float(t0))
                        break
                    await asyncio.sleep(0.0005)
            syscall.append(float(t1) - float(t0))
        st = await status(endpoint)
    return {
        "lat": lat, "acked": acked, "syscall": syscall,
        "ack_p50_us": float(st.get("ack_p50_us", 0)),
    }  # fmt: skip


def _munmap_mode(uffd_on: bool, count: int, loop: str, log: Any) -> dict[str, Any]:
    """One hmmd (uffd watcher on or off), one target, ``count`` munmaps."""
    with tmpdir() as d, Procs() as procs:
        extra = [] if uffd_on else ["--uffd", "off"]
        dmn = start_daemon(procs, f"ipc://{d}/hmmd.sock", d, extra)
        mode = "expose" if uffd_on else "none"
        target = procs.spawn([PY, "-c", TARGET, mode, str(count), dmn.endpoint])
        addr = int(read_line(target, "ready", 30).split()[1])
        settle(log)
        r: dict[str, Any] = baseline_fanout.run_bounded(
            loop, _munmap_run(dmn.endpoint, target, addr, count), 300
        )
    return r


def _written_cost(log: Any) -> dict[str, float]:
    """ms per GiB of hmmd's get-and-clear scan at 0% and at 1% written."""
    from hmmirror.daemon.linux import scan
    from hmmirror.daemon.linux import userfaultfd as uffd

    n = (1 << 30) // PAGE
    with Procs() as procs:
        target = procs.spawn([PY, "-c", TARGET, "leave", str(n)])
        fd_line = read_line(target, "uffd", 60)
        addr = int(read_line(target, "ready", 60).split()[1])
        pidfd = os.pidfd_open(target.pid)
        ufd = uffd.getfd(pidfd, int(fd_line.split()[1]))
        uffd.api(ufd, uffd.WATCH_FEATURES)
        uffd.register(ufd, addr, n * PAGE)
        pm = os.open(f"/proc/{target.pid}/pagemap", os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            scan.written(pm, addr, addr + n * PAGE)  # arms it
            arm = time.perf_counter() - t0
            idle = []
            busy = []
            found = 0
            for seed in range(5):
                t0 = time.perf_counter()
                scan.written(pm, addr, addr + n * PAGE)
                idle.append(time.perf_counter() - t0)
                assert target.stdin is not None and target.stdout is not None
                target.stdin.write(f"write {n // 100} {seed}\n".encode())
                target.stdin.flush()
                target.stdout.readline()
                t0 = time.perf_counter()
                runs = scan.written(pm, addr, addr + n * PAGE)
                busy.append(time.perf_counter() - t0)
                found = sum((b - a) // PAGE for a, b in runs)
        finally:
            os.close(pm)
            os.close(ufd)
            os.close(pidfd)
    log(f"[written] 1 GiB: arm {arm * 1e3:.1f} ms; scan at 0%: {statistics.median(idle) * 1e3:.2f}"
        f" ms; at 1%: {statistics.median(busy) * 1e3:.2f} ms ({found} pages reported of "
        f"{n // 100} written)")  # fmt: skip
    return {"idle": statistics.median(idle), "busy": statistics.median(busy), "found": found,
            "written": n // 100}  # fmt: skip


async def _touch_run(endpoint: str, target: Any, addr: int, n: int, how: str) -> list[float]:
    """p50 and p99 (µs) of the target's first store to each of ``n`` pages, mirrored ``how``."""
    from hmmirror.client import Access, connect

    loop = asyncio.get_running_loop()
    async with connect(endpoint, name="bench-touch") as s:
        if how != "none":
            mirror = await s.mirror(
                target.pid, addr, n * PAGE, Access.READ,
                watch_writes=how == "async", strict_writes=how == "strict",
            )  # fmt: skip
            await mirror.fault(addr, n)
        target.stdin.write(f"touch {n}\n".encode())
        target.stdin.flush()
        line = await loop.run_in_executor(None, target.stdout.readline)
    _, p50, p99 = line.split()
    return [int(p50) / 1e3, int(p99) / 1e3]


def _write_cost(n: int, loop: str, log: Any) -> dict[str, list[float]]:
    """Per-store cost to the target: unwatched, WP_ASYNC tracking, strict (synchronous) WP."""
    out: dict[str, list[float]] = {}
    for how in ("none", "async", "strict"):
        with tmpdir() as d, Procs() as procs:
            dmn = start_daemon(procs, f"ipc://{d}/hmmd.sock", d)
            target = procs.spawn([PY, "-c", TARGET, "expose2", str(n), dmn.endpoint])
            addr = int(read_line(target, "ready", 30).split()[1])
            out[how] = baseline_fanout.run_bounded(
                loop, _touch_run(dmn.endpoint, target, addr, n, how), 300
            )
        log(f"[store cost {how}] p50 {out[how][0]:.2f} us, p99 {out[how][1]:.2f} us")
    return out


def bench_uffd(count: int, loop: str, log: Any = print) -> list[Row]:
    rows: list[Row] = []
    modes = {}
    for on in (True, False):
        r = _munmap_mode(on, count, loop, log)
        name = "uffd" if on else "proc"
        modes[name] = r
        log(f"[munmap {name}] to INVALIDATE at the agent: p50 {percentile(r['lat'], 50) * 1e6:.0f}"
            f" us, p99 {percentile(r['lat'], 99) * 1e6:.0f} us ({len(r['lat'])}/{count} seen); "
            f"to all acked p50 {percentile(r['acked'], 50) * 1e6:.0f} us; "
            f"munmap syscall p50 {percentile(r['syscall'], 50) * 1e6:.0f} us; hmmd ack p50 "
            f"{r['ack_p50_us']:.0f} us")  # fmt: skip
    u, p = modes["uffd"], modes["proc"]
    u50, p50 = percentile(u["acked"], 50), percentile(p["acked"], 50)
    bound = percentile(u["syscall"], 50) + 1.3 * u["ack_p50_us"] / 1e6
    rows.append(Row(
        "munmap -> all acked p50, uffd watcher (bound: munmap p50 + 1.3 x ack p50)",
        f"{u50 * 1e6:.0f} us", f"{bound * 1e6:.0f} us", u50 / bound, "<= 1.0",
        "PASS" if u50 <= bound else "FAIL",
        f"p99 {percentile(u['acked'], 99) * 1e6:.0f} us; INVALIDATE at the agent p50 "
        f"{percentile(u['lat'], 50) * 1e6:.0f} us; munmap syscall p50 "
        f"{percentile(u['syscall'], 50) * 1e6:.0f} us with the uffd, "
        f"{percentile(p['syscall'], 50) * 1e6:.0f} us without",
    ))  # fmt: skip
    rows.append(Row(
        "munmap -> all acked p50, proc watcher", f"{p50 * 1e6:.0f} us",
        f"{u50 * 1e6:.0f} us (uffd)", p50 / u50 if u50 else None, "info", "info",
        f"p99 {percentile(p['acked'], 99) * 1e6:.0f} us",
    ))  # fmt: skip
    cost = _write_cost(count, loop, log)
    rows.append(Row(
        "first store to a page, strict write-protect p50 (vs WP_ASYNC tracking)",
        f"{cost['strict'][0]:.1f} us", f"{cost['async'][0]:.2f} us",
        cost["strict"][0] / cost["async"][0] if cost["async"][0] else None, "info", "info",
        f"p99 strict {cost['strict'][1]:.1f} us, WP_ASYNC {cost['async'][1]:.2f} us; an "
        f"unwatched store p50 {cost['none'][0]:.2f} us",
    ))  # fmt: skip
    w = _written_cost(log)
    rows.append(Row("written scan, 1 GiB, 0% written", f"{w['idle'] * 1e3:.2f} ms/GiB", "-",
                    None, "info", "info"))  # fmt: skip
    rows.append(Row(
        "written scan, 1 GiB, 1% written", f"{w['busy'] * 1e3:.2f} ms/GiB", "-", None, "info",
        "info" if w["found"] == w["written"] else "FAIL",
        f"{w['found']} pages reported, {w['written']} written",
    ))  # fmt: skip
    return rows
