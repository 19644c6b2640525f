"""Run the hmmirror benchmarks.

``uv run python -m bench`` or
``uv run python bench/run.py [--only invalidate|pipelined|fault|rdma|uffd|soak|scaling]``.

Every result is a ratio to a baseline measured in the same run; see bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
from common import Row, loadavg, machine_info, print_table
from soak_rig import split


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if s[-1:] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def default_daemons() -> int:
    """``--soak-daemons`` and ``--scaling-daemons``'s default: 4 hmmd instances on a server
    (one event loop cannot make the 4x, nor perhaps the 30,000/s, asked there), 1 on fewer
    CPUs, where two vCPUs are saturated by one."""
    return 4 if common.is_server() else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument(
        "--only",
        choices=["invalidate", "pipelined", "fault", "rdma", "uffd", "soak", "scaling"],
        action="append",
        help="run only this benchmark (repeatable); default: the first five (soak and "
        "scaling only when asked: they take minutes)",
    )
    ap.add_argument(
        "--agents", default="1,8", help="agent counts for the W=1 benchmark (default 1,8)"
    )
    ap.add_argument(
        "--count", type=int, default=2000, help="W=1 timed invalidations per case (2000)"
    )
    ap.add_argument(
        "--warmup", type=int, default=200, help="W=1 untimed invalidations per case (200)"
    )
    ap.add_argument(
        "--pipe-agents", type=int, default=8, help="agents for the pipelined benchmark (8)"
    )
    ap.add_argument("--window", type=int, default=64, help="concurrent sync_range calls (64)")
    ap.add_argument(
        "--pipe-warmup", type=float, default=0.5, help="pipelined warm-up seconds (0.5)"
    )
    ap.add_argument("--duration", type=float, default=3.0, help="pipelined measured seconds (3.0)")
    ap.add_argument(
        "--fault-size", default="1G", help="populated range for the fault benchmark (1G)"
    )
    ap.add_argument("--fault-runs", type=int, default=5, help="timed fault runs per mode (5)")
    ap.add_argument("--rdma-window", type=int, default=8, help="RDMA requests in flight (8)")
    ap.add_argument(
        "--rdma-seconds", type=float, default=0.4, help="RDMA seconds per block and side (0.4)"
    )
    ap.add_argument("--rdma-rounds", type=int, default=5, help="RDMA blocks per side (5)")
    ap.add_argument(
        "--fault-count", type=int, default=300, help="ODP first-touch faults timed (300)"
    )
    ap.add_argument(
        "--munmap-count", type=int, default=300, help="munmaps timed per watcher mode (300)"
    )
    ap.add_argument("--soak-seconds", type=float, default=60.0, help="soak: measured seconds (60)")
    ap.add_argument("--soak-agents", type=int, default=8, help="soak: agent processes (8)")
    ap.add_argument(
        "--soak-rate",
        type=float,
        default=None,
        help="soak: invalidating ops/s asked (the goal's rate for this machine: 30000 with "
        f"{common.SERVER_CPUS}+ CPUs, else 10000; here {common.soak_rate_goal():.0f})",
    )
    ap.add_argument(
        "--soak-threads", type=int, default=16, help="soak: target churn threads in all (16)"
    )
    ap.add_argument(
        "--soak-target-procs",
        type=int,
        default=4,
        help="soak: target processes (separate mms) sharing the arena, threads and rate (4: "
        "one Python process is GIL-bound, and the churn must not be the limit)",
    )
    ap.add_argument(
        "--soak-daemons",
        type=int,
        default=None,
        help="soak: hmmd instances, their sockets in one directory (sharing hmmd-owners); "
        f"target j is owned by instance j mod D (4 with {common.SERVER_CPUS} or more CPUs, "
        f"else 1; here {default_daemons()}; 1..8)",
    )
    ap.add_argument(
        "--soak-pages", type=int, default=4096, help="soak: target arena, in 4 KiB pages (4096)"
    )
    ap.add_argument(
        "--soak-fault-hz",
        type=float,
        default=20.0,
        help="soak: each agent faults a random 64-page run this often per second (20)",
    )
    ap.add_argument(
        "--soak-warmup", type=float, default=5.0, help="soak: seconds of churn before measuring (5)"
    )
    ap.add_argument(
        "--soak-check-every",
        type=float,
        default=15.0,
        help="soak: seconds of running between quiescent oracle checks (15; one at the end too)",
    )
    ap.add_argument(
        "--scaling-targets",
        type=int,
        default=8,
        help="scaling: target processes of the many-target case (8); the soak-* flags set the "
        "rest (agents, total threads and pages, seconds, warm-up)",
    )
    ap.add_argument(
        "--scaling-rate",
        type=float,
        default=80000.0,
        help="scaling: invalidating ops/s asked in all, in both cases (80000)",
    )
    ap.add_argument(
        "--scaling-daemons",
        type=int,
        default=None,
        help="scaling: hmmd instances, their sockets in one directory (sharing hmmd-owners), "
        "serving both cases; target j is owned by instance j mod D (4 with "
        f"{common.SERVER_CPUS} or more CPUs, else 1; here {default_daemons()}; 1..8)",
    )
    ap.add_argument("--plots", metavar="DIR", help="soak: where its PNGs go (bench/out)")
    ap.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="event loop of the baseline router and of our driver/agents (uvloop)",
    )
    ap.add_argument(
        "--daemon-args", default="", help="extra hmmd arguments, e.g. '--ack-deadline 2s'"
    )
    ap.add_argument(
        "--diag",
        action="store_true",
        help="also run hmmd with raw-protocol blocking agents (info rows): "
        "separates the daemon's cost from the client library's",
    )
    ap.add_argument(
        "--idle-wait",
        type=float,
        default=10.0,
        help="max seconds to wait for an idle machine before each measurement (10; 0=off)",
    )
    ap.add_argument(
        "--profile-daemon",
        metavar="DIR",
        help="run every hmmd under cProfile, writing DIR/hmmd-N.prof (slows hmmd)",
    )
    ap.add_argument(
        "--block",
        type=int,
        default=250,
        help="W=1: baseline and ours alternate in blocks of this many (250)",
    )
    a = ap.parse_args(argv)
    if a.soak_rate is None:
        a.soak_rate = common.soak_rate_goal()
    if a.scaling_daemons is None:
        a.scaling_daemons = default_daemons()
    if a.soak_daemons is None:
        a.soak_daemons = default_daemons()

    # Bounds: every loop below is bounded in count and time.
    if not 1 <= a.block <= 200_000:
        ap.error("--block must be 1..200000")
    if not (1 <= a.count <= 200_000 and 0 <= a.warmup <= 100_000):
        ap.error("--count must be 1..200000, --warmup 0..100000")
    if not (0 < a.duration <= 60 and 0 <= a.pipe_warmup <= 30 and 1 <= a.window <= 4096):
        ap.error("--duration 0..60 s, --pipe-warmup 0..30 s, --window 1..4096")
    agents = [int(x) for x in a.agents.split(",") if x.strip()]
    if not agents or any(not 1 <= n <= 64 for n in agents) or not 1 <= a.pipe_agents <= 64:
        ap.error("agent counts must be 1..64")
    size = parse_size(a.fault_size)
    if size % 4096 or not 0 < size <= 1 << 30 or not 1 <= a.fault_runs <= 50:
        ap.error("--fault-size: page multiple up to 1G; --fault-runs 1..50")
    if not (1 <= a.rdma_window <= 256 and 0 < a.rdma_seconds <= 10 and 1 <= a.rdma_rounds <= 20):
        ap.error("--rdma-window 1..256, --rdma-seconds 0..10, --rdma-rounds 1..20")
    if not 1 <= a.munmap_count <= 5_000:
        ap.error("--munmap-count 1..5000")
    if not 1 <= a.fault_count <= 20_000:
        ap.error("--fault-count 1..20000")
    if not (1 <= a.soak_seconds <= 3600 and 1 <= a.soak_agents <= 64 and 1 <= a.soak_rate <= 1e6):
        ap.error("--soak-seconds 1..3600, --soak-agents 1..64, --soak-rate 1..1000000")
    if not (1 <= a.soak_threads <= 32 and a.soak_pages % 64 == 0 and 64 * a.soak_threads
            <= a.soak_pages <= 1 << 20):  # fmt: skip
        ap.error("--soak-threads 1..32; --soak-pages a multiple of 64, 64 per thread, <= 1M")
    if not 1 <= a.soak_target_procs <= 16:
        ap.error("--soak-target-procs 1..16")
    if not (2 <= a.scaling_targets <= 16 and 1 <= a.scaling_rate <= 1e6):
        ap.error("--scaling-targets 2..16, --scaling-rate 1..1000000")
    if not (1 <= a.scaling_daemons <= common.MAX_DAEMONS
            and 1 <= a.soak_daemons <= common.MAX_DAEMONS):  # fmt: skip
        ap.error(f"--scaling-daemons and --soak-daemons 1..{common.MAX_DAEMONS}")
    # Each target process owns whole slots, at least one per thread (scaling's too, if run).
    for n in {a.soak_target_procs, a.scaling_targets if "scaling" in (a.only or []) else 1}:
        pages, threads = split(a.soak_pages, a.soak_threads, n)
        if pages < 64 * threads:
            ap.error(f"--soak-pages {a.soak_pages} is too small for {n} target processes of "
                     f"{threads} threads (64 pages per thread and process)")  # fmt: skip
    if not (0 <= a.soak_fault_hz <= 1000 and 0 <= a.soak_warmup <= 600
            and 1 <= a.soak_check_every <= 3600):  # fmt: skip
        ap.error("--soak-fault-hz 0..1000, --soak-warmup 0..600 s, --soak-check-every 1..3600 s")
    daemon_args = shlex.split(a.daemon_args)
    if a.profile_daemon:
        os.makedirs(a.profile_daemon, exist_ok=True)
        common.PROFILE_DIR = os.path.abspath(a.profile_daemon)
    common.IDLE_WAIT = max(0.0, min(a.idle_wait, 300.0))
    only = set(a.only or ["invalidate", "pipelined", "fault", "rdma", "uffd"])

    def _terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwind so every finally kills its helper processes

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    print("hmmirror benchmarks  " + time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    print("machine (start): " + machine_info(), flush=True)
    t0 = time.monotonic()
    rows: list[Row] = []
    if "invalidate" in only:
        from bench_invalidate import bench_w1

        rows += bench_w1(agents, a.count, a.warmup, a.loop, daemon_args, a.diag, a.block)
    if "pipelined" in only:
        from bench_invalidate import bench_pipelined

        rows += bench_pipelined(
            a.pipe_agents, a.window, a.pipe_warmup, a.duration, a.loop, daemon_args, a.diag
        )
    if "fault" in only:
        from bench_fault import bench_fault

        rows += bench_fault(size, a.fault_runs, a.loop, daemon_args)
    if "rdma" in only:
        from bench_rdma import bench_rdma

        rows += bench_rdma(
            a.rdma_window, a.rdma_seconds, a.rdma_rounds, a.fault_count, a.loop, daemon_args
        )
    if "uffd" in only:
        from bench_uffd import bench_uffd

        rows += bench_uffd(a.munmap_count, a.loop)
    if "soak" in (a.only or []):
        from bench_soak import bench_soak

        soak = {
            "seconds": a.soak_seconds, "agents": a.soak_agents, "rate": a.soak_rate,
            "threads": a.soak_threads, "pages": a.soak_pages, "fault_hz": a.soak_fault_hz,
            "warmup": a.soak_warmup, "check_every": a.soak_check_every, "plots": a.plots,
            "target_procs": a.soak_target_procs, "daemons": a.soak_daemons,
        }  # fmt: skip
        rows += bench_soak(soak, daemon_args)
    if "scaling" in (a.only or []):
        from bench_scaling import bench_scaling

        scaling = {
            "seconds": a.soak_seconds, "agents": a.soak_agents, "rate": a.scaling_rate,
            "threads": a.soak_threads, "pages": a.soak_pages, "fault_hz": a.soak_fault_hz,
            "warmup": a.soak_warmup, "targets": a.scaling_targets, "daemons": a.scaling_daemons,
        }  # fmt: skip
        rows += bench_scaling(scaling, daemon_args)
    print()
    print(f"machine (end): loadavg={loadavg()}  elapsed {time.monotonic() - t0:.0f} s")
    print()
    print_table(rows)
    bad = [r for r in rows if r.verdict in ("FAIL", "ERROR")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
