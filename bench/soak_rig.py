"""The churn rig that benchmarks 6 (``bench_soak``) and 7 (``bench_scaling``) share.

``Rig`` brings up, against an hmmd already running, N churning target processes and M agent
processes (``soak_procs.py``), each agent mirroring every target's whole arena (one mirror per
target), and measures them: ``measure`` asks the targets for a total rate, waits the warm-up,
then reads hmmd's Status ``invalidations`` and the CPU time of hmmd, the agents and the targets
(/proc/PID/stat) once per window, with quiescent oracle checks (every target SIGSTOPped, hmmd
quiet, every agent runs the translation oracle over its mirrors) in between; paused time is in
no window. ``finish`` stops the churn and collects the processes' own counts. The processes
belong to the caller's ``Procs``, which kills them.

The arena, the churn threads and the asked rate are *totals*: with N targets each gets 1/N of
them (``split``), so N only changes how many processes, and mms, the same churn comes from.

Several hmmd instances (benchmark 7's ``--scaling-daemons``): the rig is given each one's
endpoint and pid, their sockets in one directory so that they share ``hmmd-owners`` (SPEC.md
§1.7). Target j exposes its userfaultfd to instance j mod D, which then owns it, and each
agent opens a ``SessionGroup`` with all of them, which asks the instance a pid picks first and
follows MOVED to the owner where that is another (at registration, before the measuring).
Status is read from every instance: counts summed, percentiles and lag the worst
instance's (``merge_status``); "hmmd" CPU is all instances', "hmmd_loop" the busiest
instance's main thread in each window; the quiescent check waits on every instance. With one
instance every figure is that instance's, as it always was.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PY, Procs, cpu_seconds, daemon_request, daemon_status, loadavg, read_line
from hmmirror.proto.ackbuckets import bound_label
from hmmirror.tools import ackhistogram

#: The target and agent processes.
PROCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "soak_procs.py")
#: A target's arena is cut into slots of this many pages, each owned by one churn thread.
SLOT_PAGES = 64
WINDOW_S = 5.0
#: hmmd's proc watcher polls at most 50 ms apart: 0.5 s without a new invalidation is ten polls.
QUIET_S = 0.5
QUIESCE_LIMIT_S = 20.0
#: Status figures that are no counts, merged as the worst instance's: percentiles and lag.
WORST_OF = frozenset(("ack_p50_us", "ack_p99_us", "ack_p999_us", "watch_lag_s"))
#: Status figures that are neither counts nor worst-of: merged as each instance's, in a list.
EACH_OF = frozenset(("pid", "uptime_s", "last_acked_monotonic"))


def merge_status(each: list[dict[str, Any]]) -> dict[str, Any]:
    """Several instances' Status as one: counts summed, ``WORST_OF`` the largest, anything
    else (strings, ``EACH_OF``) a list of each instance's; one instance's Status as it is."""
    if len(each) == 1:
        return each[0]
    out: dict[str, Any] = {}
    for k in each[0]:
        vals = [st.get(k) for st in each]
        if k == "ack_histogram":  # all instances' round trips: their buckets summed
            out[k] = merged_histogram([str(v or "") for v in vals])
        elif k in WORST_OF:
            out[k] = max(float(v) for v in vals if v is not None)
        elif k not in EACH_OF and all(isinstance(v, int) and not isinstance(v, bool)
                                      for v in vals):  # fmt: skip
            out[k] = sum(vals)
        else:
            out[k] = vals
    return out


def merged_histogram(texts: Sequence[str]) -> str:
    """Several instances' ``ack_histogram`` strings as one (the counts of each bucket summed),
    in the same ``"25us:3 50us:10"`` form."""
    total: dict[float, int] = {}
    for text in texts:
        for bound, count in ackhistogram.parse(text):
            total[bound] = total.get(bound, 0) + count
    return " ".join(f"{bound_label(bound)}:{count}" for bound, count in sorted(total.items()))


def vm_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


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


def split(pages: int, threads: int, targets: int) -> tuple[int, int]:
    """Each of ``targets`` processes' share of the arena (whole slots) and of the threads."""
    return pages // targets // SLOT_PAGES * SLOT_PAGES, max(1, threads // targets)


def describe_cores(cores: dict[str, float]) -> str:
    """``Rig.cpu``'s groups in words: hmmd (each instance, if several), agents, target(s) (with
    the spread per target)."""
    per = [v for k, v in cores.items() if k.startswith("target") and k != "target"]
    each = f" ({len(per)} processes, {min(per):.2f}-{max(per):.2f} each)" if per else ""
    inst = hmmd_instances(cores)
    hmmd = (
        f"hmmd {cores['hmmd']:.2f} (its event loop {cores['hmmd_loop']:.2f})"
        if len(inst) < 2
        else f"hmmd {cores['hmmd']:.2f} over {len(inst)} instances ("
        + ", ".join(f"{c:.2f}" for c in inst)
        + f"; the busiest event loop {cores['hmmd_loop']:.2f})"
    )
    return (
        f"{hmmd}, agents {cores['agents']:.2f}, target {cores['target']:.2f}{each}, bench "
        f"{cores['bench']:.2f}"
    )


def hmmd_instances(cores: dict[str, float]) -> list[float]:
    """Each hmmd instance's cores (``hmmd0``, ``hmmd1``, ...), where there are several."""
    return [cores[f"hmmd{i}"] for i in range(len(cores)) if f"hmmd{i}" in cores]


@dataclass
class Window:
    t: float  # running seconds at the window's end
    dt: float
    rate: float
    p50: float
    p99: float
    p999: float
    rss_kib: int
    cpu: dict[str, float]  # cores: hmmd, hmmd_loop, agents, target (all), bench, target0..
    load: str


@dataclass
class Check:
    held: int
    violations: int
    pause_s: float
    quiesce_s: float
    first: str = ""
    per_agent: list[int] = field(default_factory=list)


@dataclass
class Measured:
    """What ``Rig.measure`` saw: the windows, the checks, hmmd's Status (``merge_status`` of the
    instances) and VmRSS (all instances') around them, and each instance's Status."""

    windows: list[Window]
    checks: list[Check]
    st0: dict[str, Any]
    st1: dict[str, Any]
    rss0: int
    rss1: int
    each0: list[dict[str, Any]] = field(default_factory=list)
    each1: list[dict[str, Any]] = field(default_factory=list)

    @property
    def running_s(self) -> float:
        return sum(w.dt for w in self.windows)

    @property
    def invalidations(self) -> int:
        return int(self.st1["invalidations"]) - int(self.st0["invalidations"])

    def per_instance(self, key: str = "invalidations") -> list[int]:
        """Each hmmd instance's delta of Status count ``key`` over the windows."""
        return [int(b[key]) - int(a[key]) for a, b in zip(self.each0, self.each1, strict=True)]

    def cores(self) -> dict[str, float]:
        """Cores used per process group, weighted by window length."""
        return {k: sum(w.cpu[k] * w.dt for w in self.windows) / self.running_s
                for k in self.windows[0].cpu}  # fmt: skip


class Rig:
    """``targets`` churning targets and ``agents`` agents mirroring all of them, on one hmmd
    or on several (``daemons``: each instance's endpoint and pid)."""

    def __init__(
        self,
        procs: Procs,
        daemons: Sequence[tuple[str, int]],
        *,
        targets: int,
        pages: int,
        threads: int,
        agents: int,
        fault_hz: float,
        log: Any = print,
        tag: str = "soak",
    ) -> None:
        if not daemons or any("," in e for e, _ in daemons):
            # The processes get the endpoints comma-separated (soak_procs.py's command lines).
            raise ValueError(f"endpoints must be given, none with a comma: {daemons}")
        self.procs = procs
        self.endpoints = [e for e, _ in daemons]
        self.hmmds = [pid for _, pid in daemons]
        self.ntargets, self.nagents, self.fault_hz = targets, agents, fault_hz
        self.pages, self.threads = split(pages, threads, targets)
        if self.pages < SLOT_PAGES * self.threads:  # every thread owns at least one slot
            raise ValueError(f"{self.pages} pages per target: fewer slots than {self.threads} "
                             "threads")  # fmt: skip
        self.log, self.tag = log, tag
        self.targets: list[Any] = []
        #: The hmmd instance each target exposed its userfaultfd to (target j: j mod D).
        self.owner: list[int] = []
        self.agents: list[Any] = []
        self.checks: list[Check] = []
        self.mode = "?"
        self.valid0 = 0

    def _say(self, text: str) -> None:
        self.log(f"[{self.tag}] {text}")

    def status(self) -> list[dict[str, Any]]:
        """Each hmmd instance's Status, in the order of ``endpoints``."""
        return [daemon_status(e) for e in self.endpoints]

    def rss(self) -> int:
        """VmRSS of all hmmd instances, in KiB."""
        return sum(vm_rss_kib(pid) for pid in self.hmmds)

    def _spawn_targets(self) -> None:
        """Start the targets, spread evenly over the hmmd instances: target j hands its
        userfaultfd to instance j mod D, which owns it from then on. The agents' groups ask
        the instance the pid picks first and follow MOVED where that is another (once per
        agent and target, at registration; the notes count them)."""
        ninst = len(self.endpoints)
        for j in range(self.ntargets):  # target 0's seed is the one soak used alone (1)
            k = j % ninst
            argv = ["target", self.endpoints[k], str(self.pages), str(self.threads),
                    str(1 + 100 * j)]  # fmt: skip
            self.targets.append(self.procs.spawn([PY, PROCS, *argv]))
            self.owner.append(k)

    def start(self) -> None:
        """Start the targets, then the agents (each mirroring every target); wait until ready."""
        self._spawn_targets()
        ranges: list[str] = []
        for t in self.targets:
            _, _, addr_s, len_s = read_line(t, "target ready", 60.0).split()
            ranges += [str(t.pid), addr_s, len_s]
        for i in range(self.nagents):
            extra = ranges[3:]
            argv = ["agent", ",".join(self.endpoints), f"{self.tag}-agent-{i}", *ranges[:3],
                    str(self.fault_hz), str(100 + i), *extra]  # fmt: skip
            self.agents.append(self.procs.spawn([PY, PROCS, *argv]))
        self.valid0 = sum(
            int(read_line(p, "agent ready", 60.0).rsplit("=", 1)[1]) for p in self.agents
        )
        watched = sum(int(st.get("uffd_watched", 0)) for st in self.status())
        self.mode = (
            f"uffd ({watched} of {self.ntargets} targets exposed their userfaultfd) + proc watcher"
            if watched
            else "proc only"
        )
        if len(self.hmmds) == 1:
            where = f"hmmd pid {self.hmmds[0]}"
        else:
            per = [self.owner.count(k) for k in range(len(self.hmmds))]
            where = (
                f"{len(self.hmmds)} hmmd instances (pids {','.join(map(str, self.hmmds))}), "
                f"targets per instance {per}"
            )
        self._say(
            f"{where}; {self.ntargets} target(s) (pids "
            f"{','.join(str(t.pid) for t in self.targets)}), each {self.pages >> 8} MiB arena, "
            f"{self.threads} churn threads; {len(self.agents)} agents ready, each mirroring every "
            f"target, {self.valid0} VALID entries after the first fault; watching: {self.mode}"
        )

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far: hmmd, the agents, the targets (all, and each if several), bench."""
        per = [cpu_seconds(t.pid) for t in self.targets]
        each = [cpu_seconds(pid) for pid in self.hmmds]
        # The main thread alone: the one event loop that a single hmmd cannot spread over
        # cores (the rest is libzmq's I/O thread and the DMA copiers).
        loops = [cpu_seconds(pid, pid) for pid in self.hmmds]
        out = {
            "hmmd": sum(each),
            # With several instances ``measure`` makes each window's the busiest instance's.
            "hmmd_loop": loops[0],
            "agents": sum(cpu_seconds(p.pid) for p in self.agents),
            "target": sum(per),
            "bench": cpu_seconds(os.getpid()),
        }
        if len(each) > 1:
            out.update({f"hmmd{i}": c for i, c in enumerate(each)})
            out.update({f"hmmd{i}_loop": c for i, c in enumerate(loops)})
        if len(per) > 1:
            out.update({f"target{j}": c for j, c in enumerate(per)})
        return out

    # --- the quiescent check ----------------------------------------------------------------

    def _signal(self, sig: int) -> None:
        for t in self.targets:
            os.kill(t.pid, sig)

    def quiesce(self) -> float:
        """SIGSTOP every target and wait until hmmd (every instance) has nothing in flight and
        nothing new."""
        t0 = time.monotonic()
        self._signal(signal.SIGSTOP)
        deadline = t0 + QUIESCE_LIMIT_S
        last_inv, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            inv = sum(int(st["invalidations"]) for st in self.status())
            mms = [m for e in self.endpoints for m in daemon_mms(e)]
            now = time.monotonic()
            if inv != last_inv:
                last_inv, last_change = inv, now
            idle = all(m["active"] == 0 and m["seq"] % 2 == 0 for m in mms)
            stopped = all(all_stopped(t.pid) for t in self.targets)
            if idle and stopped and now - last_change >= QUIET_S:
                return now - t0
            time.sleep(0.05)
        raise RuntimeError(f"hmmd did not quiesce within {QUIESCE_LIMIT_S} s (targets stopped)")

    def check(self) -> Check:
        """A quiescent check: every agent runs the translation oracle over its mirrors."""
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
            self._signal(signal.SIGCONT)
        c = Check(held, viol, time.monotonic() - t0, q, first, per)
        self.checks.append(c)
        self._say(
            f"oracle check {len(self.checks)}: targets stopped, quiet after {q:.2f} s; "
            f"{held} VALID entries checked ({min(per)}-{max(per)} per agent), "
            f"{viol} violations{' first: ' + first if first else ''}; paused {c.pause_s:.2f} s"
        )
        return c

    # --- the run ----------------------------------------------------------------------------

    def measure(self, rate: float, warmup: float, seconds: float, check_every: float) -> Measured:
        """Churn at ``rate`` in all; after ``warmup`` s, ``seconds`` s of windows and checks."""
        total_s = warmup + seconds + 300.0
        for t in self.targets:
            assert t.stdin is not None
            t.stdin.write(f"go {rate / self.ntargets} {total_s}\n".encode())
            t.stdin.flush()
        self._say(f"churn started: asked {rate:.0f} invalidating ops/s; warm-up {warmup:.0f} s")
        time.sleep(warmup)
        # hmmd's first Status with round trips in its ring runs numpy's percentile for the
        # first time, which costs it ~8 MB once (numpy's lazy set-up): ask before measuring.
        self.status()
        rss0 = self.rss()
        each0 = self.status()
        st0 = merge_status(each0)
        self._say(
            f"warm-up done: hmmd VmRSS {rss0} KiB, invalidations so far "
            f"{st0['invalidations']}, load {loadavg()}"
        )
        windows: list[Window] = []
        ncheck0 = len(self.checks)
        running = 0.0
        next_check = check_every
        wall_deadline = time.monotonic() + seconds * 3 + 120.0
        prev_sts, prev_t, prev_cpu = each0, time.monotonic(), self.cpu()
        st1, rss1, each1 = st0, rss0, each0
        while running < seconds - 1e-6 and time.monotonic() < wall_deadline:
            time.sleep(max(0.0, min(WINDOW_S, seconds - running)))
            now = time.monotonic()
            sts = self.status()
            st, prev_st = merge_status(sts), merge_status(prev_sts)
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
                rss_kib=self.rss(),
                cpu={k: (cpu[k] - prev_cpu[k]) / dt for k in cpu},
                load=loadavg(),
            )
            if len(self.hmmds) > 1:  # the event loop nearest its ceiling in this window
                w.cpu["hmmd_loop"] = max(w.cpu[f"hmmd{i}_loop"] for i in range(len(self.hmmds)))
            windows.append(w)
            per = [w.cpu[f"target{j}"] for j in range(self.ntargets) if f"target{j}" in w.cpu]
            each = f" ({min(per):.2f}-{max(per):.2f} each)" if per else ""
            loop, inst = "loop", ""
            if len(self.hmmds) > 1:  # each instance's share, in the order of the endpoints
                loop = "busiest loop"
                rates = [(int(b["invalidations"]) - int(a["invalidations"])) / dt
                         for a, b in zip(prev_sts, sts, strict=True)]  # fmt: skip
                inst = (
                    f"  per instance: {'/'.join(f'{r:.0f}' for r in rates)} inval/s, cores "
                    + "/".join(f"{w.cpu[f'hmmd{i}']:.2f}" for i in range(len(self.hmmds)))
                )
            self._say(
                f"t={w.t:5.1f}s  {w.rate:7.0f} inval/s ({w.rate / rate:4.0%} of "
                f"asked)  ack p50/p99/p99.9 {w.p50:.0f}/{w.p99:.0f}/{w.p999:.0f} us  hmmd RSS "
                f"{w.rss_kib} KiB  cores: hmmd {w.cpu['hmmd']:.2f} ({loop} "
                f"{w.cpu['hmmd_loop']:.2f}) agents {w.cpu['agents']:.2f} target "
                f"{w.cpu['target']:.2f}{each}  evictions {st['evictions']}  load {w.load}{inst}"
            )
            last = running >= seconds - 1e-6
            if last:
                rss1, st1, each1 = self.rss(), st, sts
            if running >= next_check or last:
                next_check = running + check_every
                self.check()
            prev_sts, prev_t, prev_cpu = self.status(), time.monotonic(), self.cpu()
        if not windows or running < seconds - 1e-6:
            raise RuntimeError(f"{self.tag} ran {running:.1f} of {seconds} s before its deadline")
        return Measured(windows, self.checks[ncheck0:], st0, st1, rss0, rss1, each0, each1)

    def finish(self) -> tuple[dict[str, int], list[dict[str, int]], list[dict[str, Any]]]:
        """Stop the churn -> the targets' counts summed, each target's, and the agents' stats."""
        for t in self.targets:
            assert t.stdin is not None
            t.stdin.write(b"stop\n")
            t.stdin.flush()
        each = [
            json.loads(read_line(t, "target done", 30.0).split(" ", 2)[2]) for t in self.targets
        ]
        total = {k: sum(c[k] for c in each) for k in each[0]}
        agents: list[dict[str, Any]] = []
        for p in self.agents:
            try:
                assert p.stdin is not None
                p.stdin.close()
                agents.append(json.loads(read_line(p, "agent stats", 10.0).split(" ", 2)[2]))
                p.wait(5.0)
            except Exception as exc:
                agents.append({"error": repr(exc)[:200]})
        return total, each, agents
