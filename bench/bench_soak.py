"""Benchmark 6: soak and load. A real hmmd, N agent processes, a churning target, minutes long.

* **Target** (``target`` mode of ``soak_procs.py``): one anonymous arena (``--soak-pages``,
  default 4096 pages = 16 MiB, THP off for it) cut into slots of 64 pages. It hands hmmd its
  userfaultfd (``hmmirror.client.expose``), so munmap and madvise(DONTNEED) reach hmmd as uffd
  events (UNMAP, REMOVE) while the target waits in the syscall. ``--soak-threads`` threads (each
  owning its own slots) pace *invalidating* operations to ``--soak-rate`` per second in all: 96%
  madvise(DONTNEED) of 1-4 pages, 4% munmap of a whole slot (mapped again at once). Around them,
  unpaced: writes that bring pages back (two per operation), and an mprotect read-only / back
  read-write of a slot every 50 operations (seen by hmmd's proc watcher, which also registers the
  re-mapped slots with the uffd). A thread that falls more than 50 ms behind its schedule skips
  ahead rather than bursting, and counts what it skipped. ``--soak-target-procs N`` (default 4)
  spreads this over N target processes, each its own mm registered with hmmd with its own
  userfaultfd and 1/N of the arena, of the threads and of the rate: one Python process is
  GIL-bound (about 0.8 of a core at 10,000/s), so with one target the target, not hmmd, would
  be the limit: on a many-core machine, and at the line on two vCPUs.
* **Agents** (``agent`` mode of ``soak_procs.py``): real client-library sessions, each mirroring
  the whole arena of every target READ|WRITE (one mirror per target), faulting all of it in
  (PRESENT mode: what is present, nothing faulted in) at the start and then ``--soak-fault-hz``
  times a second a random run of 64 pages (of a random mirror), so the tables keep holding VALID
  translations while they are being invalidated.
* **Quiescent checks**: every ``--soak-check-every`` seconds of running and at the end, the targets
  are stopped (SIGSTOP, every thread seen stopped), hmmd is waited on until no invalidation is
  active (Inventory: every mm's seq even, ``active`` 0) and its ``invalidations`` counter has not
  moved for 0.5 s (ten proc-watcher polls at the slowest rate), and then every agent runs the
  translation oracle (``hmmirror.tools.oracle.check``: its VALID entries against the target's
  /proc pagemap and maps, read by the agent itself). The targets are resumed (SIGCONT). The time
  paused is not part of any throughput window.
* **Asked**: ``--soak-rate``, by default the goal's rate for the machine (bench/README.md): 30,000
  ops/s with 16 or more CPUs, 10,000 on fewer.
* **Reported**: hmmd's ``invalidations`` per 5 s window against the asked rate (min and median,
  and an ASCII plot; the slowest window must reach 0.95 of it); hmmd's own ack round trip
  (INVALIDATE sent -> last ACK) p50/p99/p99.9 from Status (p99 <= 2 ms is a goal with 16 or
  more CPUs), whose ring holds the last 65,536 round trips, read at the end of each window; hmmd's
  VmRSS after the warm-up and at the end; coherence violations and VALID entries checked; CPU time
  per process group per window (each target's too, if several), and the load average. Two PNGs
  beside the text (``plots.py``; ``bench/out/`` or ``--plots DIR``): the windows' rates against
  the asked one, and the run's round trips from hmmd's histogram with the windows' percentiles.

The processes and the measuring are ``soak_rig.Rig``'s, which benchmark 7 (``bench_scaling``)
shares. Run: ``uv run python -m bench --only soak [--soak-seconds 60 --soak-agents 8
--soak-rate 10000 --soak-target-procs 4]``.
"""

from __future__ import annotations

import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    SERVER_CPUS,
    Procs,
    Row,
    cpus,
    hmmds,
    is_server,
    loadavg,
    report_problems,
    settle,
    start_daemons,
    tmpdir,
)
from hmmirror.testing.hmmd import HmmdProcess
from soak_rig import Check, Measured, Rig, Window, describe_cores

#: The least share of the asked rate the slowest 5 s window must reach (bench/README.md).
HELD_GOAL = 0.95
#: hmmd's ack round trip p99 the goal allows on a server (``SERVER_CPUS`` or more CPUs), in us.
P99_GOAL_US = 2000.0


class Soak:
    """hmmd + target(s) + agents (``soak_rig.Rig``), and the run's measurements."""

    def __init__(self, a: dict[str, Any], daemon_args: list[str], log: Any) -> None:
        self.a = a
        self.daemon_args = daemon_args
        self.log = log
        self.windows: list[Window] = []
        self.checks: list[Check] = []

    def run(self) -> dict[str, Any]:
        a, log = self.a, self.log
        with tmpdir() as d, Procs() as procs:
            busy = settle(log)
            log(f"[soak] before start: {busy:.2f} cores busy with other work, load {loadavg()}")
            daemons: list[HmmdProcess] = []
            try:
                daemons = start_daemons(procs, d, int(a.get("daemons", 1)), self.daemon_args,
                                        log, "soak")  # fmt: skip
                pairs = [(h.endpoint, h.proc.pid) for h in daemons]
                rig = Rig(procs, pairs, targets=a.get("target_procs", 1),
                          pages=a["pages"], threads=a["threads"], agents=a["agents"],
                          fault_hz=a["fault_hz"], log=log)  # fmt: skip
                rig.start()
                m: Measured = rig.measure(a["rate"], a["warmup"], a["seconds"], a["check_every"])
                self.windows, self.checks = m.windows, m.checks
                tstats, each, agents = rig.finish()
                return {
                    "rss0": m.rss0, "rss1": m.rss1, "st0": m.st0, "st1": m.st1,
                    "target": tstats, "targets": each, "agents": agents, "mode": rig.mode,
                    "valid0": rig.valid0, "split": (rig.pages, rig.threads),
                }  # fmt: skip
            finally:
                report_problems(daemons, log)


def _plot(windows: list[Window], asked: float, width: int = 50) -> list[str]:
    """One bar per window: achieved invalidations/s against the asked rate ('|')."""
    top = max([asked, *(w.rate for w in windows)]) * 1.05
    mark = int(asked / top * width)
    out = []
    for w in windows:
        n = int(w.rate / top * width)
        bar = ("#" * n).ljust(width)
        bar = bar[:mark] + ("|" if n <= mark else "#") + bar[mark + 1 :]
        out.append(f"  {w.t:6.1f}s {bar} {w.rate:7.0f}/s")
    out.append(f"  {'':7} {'^ asked ' + format(asked, '.0f') + '/s':>{mark + 8}}")
    return out


def _write_plots(
    a: dict[str, Any], ws: list[Window], st0: dict[str, Any], st1: dict[str, Any], log: Any
) -> None:
    """The soak's PNGs (``plots.soak``), where matplotlib is installed (the dev group)."""
    try:
        import plots

        written = plots.soak(
            a.get("plots"), f"soak: {a['agents']} agents, {a['rate']:.0f} invalidating ops/s asked",
            [(w.t, w.dt, w.rate, w.p50, w.p99, w.p999) for w in ws], float(a["rate"]),
            str(st0.get("ack_histogram", "")), str(st1.get("ack_histogram", "")),
        )  # fmt: skip
    except ImportError as exc:
        log(f"[soak] no plots: {exc} (uv sync installs the dev group, with matplotlib)")
        return
    log(f"[soak] plots: {', '.join(written)}")


def bench_soak(a: dict[str, Any], daemon_args: list[str], log: Any = print) -> list[Row]:
    soak = Soak(a, daemon_args, log)
    try:
        r = soak.run()
    except Exception as exc:
        log(f"[soak] failed: {exc!r}")
        return [Row("soak", "ERROR", "-", None, "-", "ERROR", repr(exc)[:300])]
    ws = soak.windows
    asked = float(a["rate"])
    nd = int(a.get("daemons", 1))
    rates = [w.rate for w in ws]
    log("[soak] invalidations/s per window (after warm-up; quiescent pauses excluded):")
    for line in _plot(ws, asked):
        log(line)
    _write_plots(a, ws, r["st0"], r["st1"], log)
    lo, med = min(rates), statistics.median(rates)
    st0, st1 = r["st0"], r["st1"]
    total_inv = int(st1["invalidations"]) - int(st0["invalidations"])
    evictions = int(st1["evictions"]) - int(st0["evictions"])
    # hmmd's ring holds its last 65,536 round trips, which at these rates is most of the run:
    # the figures read at the end are the run's; the per-window reads overlap each other.
    p50, p99 = float(st1["ack_p50_us"]), float(st1["ack_p99_us"])
    p999 = float(st1.get("ack_p999_us", float("nan")))
    growth = (r["rss1"] - r["rss0"]) / r["rss0"]
    server = is_server()
    p99_info = f"info ({cpus()} CPUs)"
    viol = sum(c.violations for c in soak.checks)
    held = sum(c.held for c in soak.checks)
    cores = {k: statistics.mean(w.cpu[k] for w in ws) for k in ws[0].cpu}
    loads = f"{ws[0].load} .. {ws[-1].load}"
    t = r["target"]
    ntargets = len(r["targets"])
    pages, threads = r["split"]
    pinv = [ag.get("counters", {}).get("page_invalidations", ag.get("error")) for ag in r["agents"]]
    ferr = [ag.get("fault_errors") for ag in r["agents"]]
    lasterr = next((ag["last_error"] for ag in r["agents"] if ag.get("last_error")), "")
    where = f"cores busy (mean of windows): {describe_cores(cores)}; loadavg {loads}"
    log(f"[soak] {where}")
    log(f"[soak] target: {t}" + (f"; ops per target {[c['ops'] for c in r['targets']]}"
                                  if ntargets > 1 else ""))  # fmt: skip
    procs = (
        f"{ntargets} target processes ({pages} pages, {threads} threads each)"
        if ntargets > 1
        else "1 target process"
    )
    rows = [
        Row(
            f"soak {a['agents']} agents"
            + (f", {ntargets} targets" if ntargets > 1 else "")
            + hmmds(nd)
            + ": inval/s held, min 5 s window",
            f"{lo:.0f}/s",
            f"{asked:.0f}/s asked",
            lo / asked,
            f">= {HELD_GOAL}",
            "PASS" if lo / asked >= HELD_GOAL else "FAIL",
            f"{len(ws)} windows over {a['seconds']:.0f} s, median {med:.0f}/s, max "
            f"{max(rates):.0f}/s; {total_inv} invalidations; watching: {r['mode']}; {procs}, ops "
            f"{t.get('ops')} (dontneed {t.get('dontneed')}, munmap {t.get('munmap')}, mprotect "
            f"{t.get('mprotect')}, writes {t.get('writes')}, skipped behind schedule "
            f"{t.get('skipped')}); {where}",
        ),
        Row(
            "soak: inval/s held, median window",
            f"{med:.0f}/s",
            f"{asked:.0f}/s asked",
            med / asked,
            "info",
            "-",
        ),
        Row(
            f"soak: hmmd ack round trip p50 / p99 / p99.9{' (worst instance)' if nd > 1 else ''}",
            f"{p50:.0f} / {p99:.0f} / {p999:.0f} us",
            "-",
            None,
            f"p99 <= {P99_GOAL_US:.0f} us ({SERVER_CPUS}+ CPUs)" if server else p99_info,
            ("PASS" if p99 <= P99_GOAL_US else "FAIL") if server else "info",
            "hmmd's own figures (INVALIDATE sent -> last ACK, one per uffd drain or watcher "
            "batch), Status at the end: its ring of the last 65,536 round trips "
            f"({int(st1.get('ack_samples', 0)) or '?'} recorded in all); read at each window's "
            f"end, p99 went {min(w.p99 for w in ws):.0f}..{max(w.p99 for w in ws):.0f} us, "
            f"p99.9 {min(w.p999 for w in ws):.0f}..{max(w.p999 for w in ws):.0f} us; "
            f"evictions during the run {evictions}",
        ),
        Row(
            f"soak: hmmd VmRSS end / after warm-up{' (all instances)' if nd > 1 else ''}",
            f"{r['rss1']} KiB",
            f"{r['rss0']} KiB",
            r["rss1"] / r["rss0"],
            "<= 1.10",
            "PASS" if growth < 0.10 else "FAIL",
            f"growth {growth:+.1%}; per window " + ", ".join(str(w.rss_kib) for w in ws),
        ),
        Row(
            "soak: coherence violations (translation oracle)",
            str(viol),
            "0",
            None,
            "== 0",
            "PASS" if viol == 0 and held > 0 else "FAIL",
            f"{len(soak.checks)} quiescent checks, {held} VALID entries checked in all "
            f"({', '.join(str(c.held) for c in soak.checks)}); agents' page_invalidations "
            f"{pinv}; fault errors {ferr}"
            + (f" (last: {lasterr})" if lasterr else "")
            + (f"; first violation: {soak.checks[0].first}" if viol else ""),
        ),
        Row(
            "soak: evictions",
            str(evictions),
            "0",
            None,
            "== 0",
            "PASS" if evictions == 0 else "FAIL",
        ),
    ]
    return rows
