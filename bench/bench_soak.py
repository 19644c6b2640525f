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
  ahead rather than bursting, and counts what it skipped.
* **Agents** (``agent`` mode of ``soak_procs.py``): real client-library sessions, each mirroring
  the whole arena READ|WRITE, faulting all of it in (PRESENT mode: what is present, nothing
  faulted in) at the start and then ``--soak-fault-hz`` times a second a random run of 64 pages,
  so the tables keep holding VALID translations while they are being invalidated.
* **Quiescent checks**: every ``--soak-check-every`` seconds of running and at the end, the target
  is stopped (SIGSTOP, every thread seen stopped), hmmd is waited on until no invalidation is
  active (Inventory: every mm's seq even, ``active`` 0) and its ``invalidations`` counter has not
  moved for 0.5 s (ten proc-watcher polls at the slowest rate), and then every agent runs the
  translation oracle (``hmmirror.tools.oracle.check``: its VALID entries against the target's
  /proc pagemap and maps, read by the agent itself). The target is resumed (SIGCONT). The time
  paused is not part of any throughput window.
* **Reported**: hmmd's ``invalidations`` per 5 s window against the asked rate (min and median,
  and an ASCII plot); hmmd's own ack round trip (INVALIDATE sent -> last ACK) p50/p99/p99.9 from
  Status, whose ring holds the last 65,536 round trips, read at the end of each window; hmmd's
  VmRSS after the warm-up and at the end; coherence violations and VALID entries checked; CPU time
  per process group per window, and the load average. Two PNGs beside the text
  (``plots.py``; ``bench/out/`` or ``--plots DIR``): the windows' rates against the asked
  one, and the run's round trips from hmmd's histogram with the windows' percentiles.

Run: ``uv run python -m bench --only soak [--soak-seconds 60 --soak-agents 8 --soak-rate 10000]``.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    PY,
    Procs,
    Row,
    daemon_request,
    daemon_status,
    loadavg,
    read_line,
    settle,
    start_daemon,
    tmpdir,
)

#: The target and agent processes.
PROCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "soak_procs.py")
WINDOW_S = 5.0
#: hmmd's proc watcher polls at most 50 ms apart: 0.5 s without a new invalidation is ten polls.
QUIET_S = 0.5
QUIESCE_LIMIT_S = 20.0

# --------------------------------------------------------------------------- bench side


def vm_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def all_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is in stopped state (T or t)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if st not in ("T", "t"):
            return False
    return True


def daemon_mms(endpoint: str, timeout: float = 5.0) -> list[dict[str, int]]:
    """Raw Inventory request -> one dict per mm (``MM_COLUMNS``)."""
    from hmmirror.proto.messages import MM_COLUMNS, Inventory

    flat = daemon_request(endpoint, Inventory(), "inventory_reply", timeout).mms
    w = len(MM_COLUMNS)
    return [dict(zip(MM_COLUMNS, flat[i : i + w], strict=True)) for i in range(0, len(flat), w)]


@dataclass
class Window:
    t: float  # running seconds at the window's end
    dt: float
    rate: float
    p50: float
    p99: float
    p999: float
    rss_kib: int
    cpu: dict[str, float]
    load: str


@dataclass
class Check:
    held: int
    violations: int
    pause_s: float
    quiesce_s: float
    first: str = ""
    per_agent: list[int] = field(default_factory=list)


class Soak:
    """hmmd + target + agents, and the measurement loop."""

    def __init__(self, a: dict[str, Any], daemon_args: list[str], log: Any) -> None:
        self.a = a
        self.daemon_args = daemon_args
        self.log = log
        self.windows: list[Window] = []
        self.checks: list[Check] = []

    # --- the quiescent check ----------------------------------------------------------------

    def quiesce(self) -> float:
        """SIGSTOP the target and wait until hmmd has nothing in flight and nothing new."""
        t0 = time.monotonic()
        os.kill(self.target.pid, signal.SIGSTOP)
        deadline = t0 + QUIESCE_LIMIT_S
        last_inv, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            st = daemon_status(self.endpoint)
            mms = daemon_mms(self.endpoint)
            now = time.monotonic()
            if st["invalidations"] != last_inv:
                last_inv, last_change = int(st["invalidations"]), now
            idle = all(m["active"] == 0 and m["seq"] % 2 == 0 for m in mms)
            if idle and all_stopped(self.target.pid) and now - last_change >= QUIET_S:
                return now - t0
            time.sleep(0.05)
        raise RuntimeError(f"hmmd did not quiesce within {QUIESCE_LIMIT_S} s (target stopped)")

    def check(self) -> Check:
        t0 = time.monotonic()
        try:
            q = self.quiesce()
            for ag in self.agents:
                assert ag.stdin is not None
                ag.stdin.write(b"check\n")
                ag.stdin.flush()
            held = viol = 0
            first = ""
            per = []
            for ag in self.agents:
                parts = read_line(ag, "checked", 60.0).split(" ", 4)
                h, v = int(parts[1]), int(parts[2])
                held += h
                viol += v
                per.append(h)
                if v and not first:
                    first = parts[4] if len(parts) > 4 else ""
        finally:
            os.kill(self.target.pid, signal.SIGCONT)
        c = Check(held, viol, time.monotonic() - t0, q, first, per)
        self.checks.append(c)
        self.log(
            f"[soak] oracle check {len(self.checks)}: target stopped, quiet after {q:.2f} s; "
            f"{held} VALID entries checked ({min(per)}-{max(per)} per agent), "
            f"{viol} violations{' first: ' + first if first else ''}; paused {c.pause_s:.2f} s"
        )
        return c

    # --- the run ----------------------------------------------------------------------------

    def cpu(self) -> dict[str, float]:
        return {
            "hmmd": cpu_seconds(self.daemon.proc.pid),
            "agents": sum(cpu_seconds(p.pid) for p in self.agents),
            "target": cpu_seconds(self.target.pid),
            "bench": cpu_seconds(os.getpid()),
        }

    def run(self) -> dict[str, Any]:
        log = self.log
        with tmpdir() as d, Procs() as procs:
            self.endpoint = f"ipc://{d}/hmmd.sock"
            busy = settle(log)
            log(f"[soak] before start: {busy:.2f} cores busy with other work, load {loadavg()}")
            self.daemon = start_daemon(procs, self.endpoint, d, self.daemon_args)
            try:
                return self._run(procs)
            finally:
                bad = self.daemon.problems()
                if bad:
                    log(f"[hmmd log] {bad}")

    def _run(self, procs: Procs) -> dict[str, Any]:
        a = self.a
        log = self.log
        hmmd = self.daemon.proc.pid
        self.target = procs.spawn(
            [PY, PROCS, "target", self.endpoint, str(a["pages"]), str(a["threads"]), "1"]
        )
        _, _, addr_s, len_s = read_line(self.target, "target ready", 60.0).split()
        addr, length = int(addr_s, 16), int(len_s)
        self.agents = [
            procs.spawn(
                [
                    PY,
                    PROCS,
                    "agent",
                    self.endpoint,
                    f"soak-agent-{i}",
                    str(self.target.pid),
                    hex(addr),
                    str(length),
                    str(a["fault_hz"]),
                    str(100 + i),
                ]
            )
            for i in range(a["agents"])
        ]
        valid0 = [int(read_line(p, "agent ready", 60.0).rsplit("=", 1)[1]) for p in self.agents]
        st = daemon_status(self.endpoint)
        watched = int(st.get("uffd_watched", 0))
        mode = "uffd (target exposed its userfaultfd) + proc watcher" if watched else "proc only"
        log(
            f"[soak] hmmd pid {hmmd}, target pid {self.target.pid} arena {length >> 20} MiB at "
            f"{addr:#x}, {a['threads']} churn threads; {len(self.agents)} agents ready, "
            f"{sum(valid0)} VALID entries after the first fault; watching: {mode}"
        )
        total_s = a["warmup"] + a["seconds"] + 300.0
        assert self.target.stdin is not None
        self.target.stdin.write(f"go {a['rate']} {total_s}\n".encode())
        self.target.stdin.flush()
        log(
            f"[soak] churn started: asked {a['rate']:.0f} invalidating ops/s; "
            f"warm-up {a['warmup']:.0f} s"
        )
        time.sleep(a["warmup"])
        # hmmd's first Status with round trips in its ring runs numpy's percentile for the
        # first time, which costs it ~8 MB once (numpy's lazy set-up): ask before measuring.
        daemon_status(self.endpoint)
        rss0 = vm_rss_kib(hmmd)
        st0 = daemon_status(self.endpoint)
        log(
            f"[soak] warm-up done: hmmd VmRSS {rss0} KiB, invalidations so far "
            f"{st0['invalidations']}, load {loadavg()}"
        )
        running = 0.0
        next_check = a["check_every"]
        wall_deadline = time.monotonic() + a["seconds"] * 3 + 120.0
        prev_st, prev_t, prev_cpu = st0, time.monotonic(), self.cpu()
        while running < a["seconds"] - 1e-6 and time.monotonic() < wall_deadline:
            time.sleep(max(0.0, min(WINDOW_S, a["seconds"] - running) - 0.0))
            now = time.monotonic()
            st = daemon_status(self.endpoint)
            cpu = self.cpu()
            dt = now - prev_t
            running += dt
            w = Window(
                t=running,
                dt=dt,
                rate=(int(st["invalidations"]) - int(prev_st["invalidations"])) / dt,
                p50=float(st["ack_p50_us"]),
                p99=float(st["ack_p99_us"]),
                p999=float(st.get("ack_p999_us", float("nan"))),
                rss_kib=vm_rss_kib(hmmd),
                cpu={k: (cpu[k] - prev_cpu[k]) / dt for k in cpu},
                load=loadavg(),
            )
            self.windows.append(w)
            log(
                f"[soak] t={w.t:5.1f}s  {w.rate:7.0f} inval/s ({w.rate / a['rate']:4.0%} of "
                f"asked)  ack p50/p99/p99.9 {w.p50:.0f}/{w.p99:.0f}/{w.p999:.0f} us  hmmd RSS "
                f"{w.rss_kib} KiB  cores: hmmd {w.cpu['hmmd']:.2f} agents {w.cpu['agents']:.2f} "
                f"target {w.cpu['target']:.2f}  evictions {st['evictions']}  load {w.load}"
            )
            last = running >= a["seconds"] - 1e-6
            if last:
                rss1 = vm_rss_kib(hmmd)
                st1 = st
            if running >= next_check or last:
                next_check = running + a["check_every"]
                self.check()
            prev_st, prev_t, prev_cpu = daemon_status(self.endpoint), time.monotonic(), self.cpu()
        if not self.windows or running < a["seconds"] - 1e-6:
            raise RuntimeError(f"soak ran {running:.1f} of {a['seconds']} s before its deadline")
        self.target.stdin.write(b"stop\n")
        self.target.stdin.flush()
        tstats = json.loads(read_line(self.target, "target done", 30.0).split(" ", 2)[2])
        agents = []
        for p in self.agents:
            try:
                assert p.stdin is not None
                p.stdin.close()
                agents.append(json.loads(read_line(p, "agent stats", 10.0).split(" ", 2)[2]))
                p.wait(5.0)
            except Exception as exc:
                agents.append({"error": repr(exc)[:200]})
        return {
            "rss0": rss0,
            "rss1": rss1,
            "st0": st0,
            "st1": st1,
            "target": tstats,
            "agents": agents,
            "mode": mode,
            "valid0": sum(valid0),
        }


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
    viol = sum(c.violations for c in soak.checks)
    held = sum(c.held for c in soak.checks)
    cores = {k: statistics.mean(w.cpu[k] for w in ws) for k in ws[0].cpu}
    loads = f"{ws[0].load} .. {ws[-1].load}"
    t = r["target"]
    pinv = [ag.get("counters", {}).get("page_invalidations", ag.get("error")) for ag in r["agents"]]
    ferr = [ag.get("fault_errors") for ag in r["agents"]]
    lasterr = next((ag["last_error"] for ag in r["agents"] if ag.get("last_error")), "")
    where = (
        f"cores busy (mean of windows): hmmd {cores['hmmd']:.2f}, agents {cores['agents']:.2f}, "
        f"target {cores['target']:.2f}, bench {cores['bench']:.2f}; loadavg {loads}"
    )
    log(f"[soak] {where}")
    log(f"[soak] target: {t}")
    rows = [
        Row(
            f"soak {a['agents']} agents: inval/s held, min 5 s window",
            f"{lo:.0f}/s",
            f"{asked:.0f}/s asked",
            lo / asked,
            ">= 0.9",
            "PASS" if lo / asked >= 0.9 else "FAIL",
            f"{len(ws)} windows over {a['seconds']:.0f} s, median {med:.0f}/s, max "
            f"{max(rates):.0f}/s; {total_inv} invalidations; watching: {r['mode']}; target ops "
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
            "soak: hmmd ack round trip p50 / p99 / p99.9",
            f"{p50:.0f} / {p99:.0f} / {p999:.0f} us",
            "-",
            None,
            "info",
            "info",
            "hmmd's own figures (INVALIDATE sent -> last ACK, one per uffd drain or watcher "
            "batch), Status at the end: its ring of the last 65,536 round trips "
            f"({int(st1.get('ack_samples', 0)) or '?'} recorded in all); read at each window's "
            f"end, p99 went {min(w.p99 for w in ws):.0f}..{max(w.p99 for w in ws):.0f} us, "
            f"p99.9 {min(w.p999 for w in ws):.0f}..{max(w.p999 for w in ws):.0f} us; "
            f"evictions during the run {evictions}",
        ),
        Row(
            "soak: hmmd VmRSS end / after warm-up",
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
