"""``hmmctl demo``: hmmd, a churning target, two agents, a live table and a coherence report.

Everything is real: a daemon process, a target process that keeps mapping,
writing, mprotecting, madvising and unmapping, and two agents with their own
sessions that read and write through their mirrors. The run is split into
rounds; after each round the target is stopped, the watcher is allowed to
catch up, and the oracle compares every VALID agent entry with the live
pagemap. Then the coherence checker (``hmmctl check``) runs with the same
seed: three mlx5-model agents fault, prefetch, READ, WRITE and run atomics
while the target also forks and mremaps, judged by both of its oracles.
Exit status 1 if either part found a violation. With ``as_json`` (``hmmctl demo -j``)
the live figures go to stderr and the final report is one JSON object on stdout
(``as_dict``; its keys are documented in ``hmmctl demo --help``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Any

from hmmirror.client.errors import AgentError, DeviceError
from hmmirror.client.mirror import Mirror
from hmmirror.client.session import connect
from hmmirror.proto.messages import Access
from hmmirror.testing.hmmd import die_with_parent, start_hmmd_async
from hmmirror.testing.quiesce import quiesce
from hmmirror.tools.liveview import Reading, Screen, frame, read_hmmd
from hmmirror.tools.oracle import Violation, check
from hmmirror.tools.progress import Progress, line

PAGE = 4096
#: Seconds of the checker's rounds after the demo's own (``--check-duration``).
CHECK_SECONDS = 8.0


@dataclass
class AgentStats:
    """What one demo agent did."""

    name: str
    reads: int = 0
    writes: int = 0
    refused: int = 0
    busy: int = 0


@dataclass
class Report:
    """The demo's closing figures."""

    rounds: int = 0
    unsettled: int = 0
    """Rounds after which hmmd never settled: not checked, since the oracle would misjudge."""
    violations: list[Violation] = field(default_factory=list)
    stats: dict[str, int | float | str] = field(default_factory=dict)
    agents: list[AgentStats] = field(default_factory=list)
    mirrors: list[Mirror] = field(default_factory=list)


async def _agent(mirror: Mirror, stats: AgentStats, rng: random.Random, until: float) -> None:
    """One agent: random reads and writes through ``mirror`` until ``until``, counted."""
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        page = rng.randrange(mirror.npages)
        addr = mirror.start + page * PAGE
        try:
            if rng.random() < 0.7:
                n = min(rng.randint(1, 4), mirror.npages - page)
                await mirror.read(addr, n)
                stats.reads += 1
            else:
                await mirror.write(addr, rng.randbytes(8) + bytes(PAGE - 8))
                stats.writes += 1
        except DeviceError as exc:
            if exc.errno == errno.EBUSY:
                stats.busy += 1
            else:
                stats.refused += 1  # EFAULT/EPERM: the target unmapped or protected it; correct
        await asyncio.sleep(0)


def _agent_rows(report: Report) -> list[str]:
    """The demo's agents: what each did, and its mirror's counters."""
    rows = [
        f"{'agent':<10}{'reads':>8}{'writes':>8}{'refused':>9}{'faults':>9}"
        f"{'pages in':>10}{'invals':>8}{'zapped':>8}"
    ]
    for agent, mirror in zip(report.agents, report.mirrors, strict=True):
        c = mirror.counters
        rows.append(
            f"{agent.name:<10}{agent.reads:>8}{agent.writes:>8}{agent.refused:>9}"
            f"{c['page_faults_handled']:>9}{c['page_faults']:>10}"
            f"{c['page_invalidations_handled']:>8}{c['page_invalidations']:>8}"
        )
    return rows


def _summary(report: Report) -> str:
    """hmmd's figures in one line: what the demo writes per round where there is no screen."""
    s = report.stats
    return (
        f"hmmd: invalidations {s.get('invalidations', 0)}  ack p50 {s.get('ack_p50_us', 0)} us  "
        f"p99 {s.get('ack_p99_us', 0)} us  stale {s.get('stale', 0)}  "
        f"violations {len(report.violations)}"
    )


class LiveTable:
    """The demo's live figures: ``hmmctl top``'s full screen (``liveview``) with the
    agents' table and the progress bar in it, where ``out`` is a terminal that can show
    one; else a summary line per round on ``out`` and the bar (``progress``) apart."""

    def __init__(self, out: IO[str], progress: Progress, duration: float) -> None:
        self.out, self.progress, self.duration = out, progress, duration
        screen = Screen(out)
        self.screen = screen if screen.usable else None
        self.prev: Reading | None = None

    def __enter__(self) -> LiveTable:
        if self.screen is not None:
            self.screen.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.screen is not None:
            self.screen.__exit__(*exc)
        self.progress.close()

    async def show(self, report: Report, elapsed: float, endpoint: str) -> None:
        """Draw the figures after a round."""
        done = min(elapsed / self.duration, 1.0)
        detail = f"round {report.rounds}, {elapsed:.0f}/{self.duration:.0f} s"
        left = max(self.duration - elapsed, 0.0)
        if self.screen is None:
            with self.progress.aside():
                self.out.write(_summary(report) + "\n")
                self.out.flush()
            self.progress.update(done, detail, left)
            return
        with contextlib.suppress(AgentError):
            reading = await read_hmmd(endpoint, 2.0)
            width, height = self.screen.size()
            extra = [*_agent_rows(report), _summary(report)]
            footer = line("demo", done, detail, left, width) if self.progress.wanted else ""
            self.screen.draw(frame(reading, self.prev, title="hmmirror demo", width=width,
                                   height=height, block=self.screen.block, extra=extra,
                                   footer=footer))  # fmt: skip
            self.prev = reading


#: hmmd's ack deadline in the demo, in seconds.
ACK_DEADLINE = 2.0
#: Seconds hmmd gets to settle after a round (as the checker allows).
QUIESCE_LIMIT = 10 + 2 * ACK_DEADLINE


async def run_demo(
    duration: float, seed: int, out: IO[str], progress: Progress | None = None
) -> Report:
    """Run the demo for about ``duration`` seconds, its live figures on ``out`` and its
    progress on ``progress``; return the report."""
    report = Report()
    live = LiveTable(out, progress or Progress(None, "demo"), duration)
    with tempfile.TemporaryDirectory(prefix="hmmdemo-") as tmp:
        endpoint = f"ipc://{tmp}/hmmd.sock"
        daemon = await start_hmmd_async(
            endpoint,
            ["--ack-deadline", f"{ACK_DEADLINE}s"],
            log_path=os.path.join(tmp, "hmmd.log"),
            deadline=15,
            pdeathsig=True,  # a demo killed outright leaves no hmmd behind
        )
        target = subprocess.Popen(
            [sys.executable, "-m", "hmmirror.tools.churn", str(seed)], stdout=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )  # fmt: skip
        try:
            assert target.stdout is not None
            async with asyncio.timeout(10):
                line = await asyncio.to_thread(target.stdout.readline)
            base_s, size_s = line.split()
            base, size = int(base_s, 16), int(size_s)
            async with (
                connect(endpoint, name="agent-a") as sa,
                contextlib.AsyncExitStack() as shown,
                connect(endpoint, name="agent-b") as sb,
            ):
                for session in (sa, sb):
                    report.mirrors.append(
                        await session.mirror(target.pid, base, size, Access.READ | Access.WRITE)
                    )
                    report.agents.append(AgentStats(session.name))
                rng = random.Random(seed)
                shown.enter_context(live)
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                while loop.time() - t0 < duration:
                    target.send_signal(signal.SIGCONT)
                    until = loop.time() + 0.6
                    await asyncio.gather(
                        *(
                            _agent(m, a, random.Random(rng.random()), until)
                            for m, a in zip(report.mirrors, report.agents, strict=True)
                        )
                    )
                    target.send_signal(signal.SIGSTOP)
                    if not await quiesce(endpoint, QUIESCE_LIMIT):
                        report.unsettled += 1
                        continue
                    for mirror in report.mirrors:
                        report.violations.extend(check(mirror))
                    report.rounds += 1
                    report.stats = await sa.status()
                    await live.show(report, loop.time() - t0, endpoint)
                report.stats = await sa.status()
        finally:
            with contextlib.suppress(ProcessLookupError):
                target.kill()
            target.wait()
            await daemon.stop_async(10)
    return report


def print_report(report: Report, seed: int, out: IO[str]) -> None:
    """The closing report: a table of figures, then any violations."""
    s = report.stats
    faults = sum(m.counters["page_faults_handled"] for m in report.mirrors)
    zapped = sum(m.counters["page_invalidations"] for m in report.mirrors)
    rows = [
        ("rounds (quiescent checks)", report.rounds),
        ("invalidations (hmmd)", s.get("invalidations", 0)),
        ("invalidation round trip p50", f"{s.get('ack_p50_us', 0)} us"),
        ("invalidation round trip p99", f"{s.get('ack_p99_us', 0)} us"),
        ("faults (agents, fault calls)", faults),
        ("pages zapped (agents)", zapped),
        (
            "device reads / writes",
            f"{sum(a.reads for a in report.agents)} / {sum(a.writes for a in report.agents)}",
        ),
        ("refused (EFAULT/EPERM)", sum(a.refused for a in report.agents)),
        ("STALE refusals (hmmd)", s.get("stale", 0)),
        ("evictions", s.get("evictions", 0)),
        ("coherence violations", len(report.violations)),
        ("seed", seed),
    ]
    if report.unsettled:
        rows.insert(1, ("rounds skipped (hmmd never settled)", report.unsettled))
    width = max(len(k) for k, _ in rows)
    out.write("\nhmmirror demo report\n" + "-" * (width + 16) + "\n")
    for key, value in rows:
        out.write(f"{key:<{width}}  {value}\n")
    for v in report.violations[:20]:
        out.write(
            f"VIOLATION mirror {v.mirror} at {v.addr:#x}: {v.kind} "
            f"(entry {v.entry:#x}, live {v.live:#x})\n"
        )
    out.flush()


def as_dict(report: Report, seed: int) -> dict[str, Any]:
    """The demo's report as ``hmmctl demo -j`` prints it (without ``check``, ``elapsed_s``)."""
    s = report.stats
    return {
        "seed": seed,
        "rounds": report.rounds,
        "rounds_skipped": report.unsettled,
        "invalidations": s.get("invalidations", 0),
        "ack_p50_us": s.get("ack_p50_us", 0),
        "ack_p99_us": s.get("ack_p99_us", 0),
        "faults": sum(m.counters["page_faults_handled"] for m in report.mirrors),
        "pages_zapped": sum(m.counters["page_invalidations"] for m in report.mirrors),
        "reads": sum(a.reads for a in report.agents),
        "writes": sum(a.writes for a in report.agents),
        "refused": sum(a.refused for a in report.agents),
        "stale": s.get("stale", 0),
        "evictions": s.get("evictions", 0),
        "violations": [
            {"mirror": v.mirror, "addr": v.addr, "kind": v.kind, "entry": v.entry, "live": v.live}
            for v in report.violations
        ],
    }


def main(
    duration: float, seed: int, check_duration: float = CHECK_SECONDS, as_json: bool = False
) -> int:
    """Run the demo, then the checker; print both reports (as one JSON object under
    ``as_json``, the live figures then on stderr); 0 if coherent, 1 if any violation."""
    import uvloop
    from hmmirror.tools.check import Checker, Options
    from hmmirror.tools.check import print_report as print_check
    from hmmirror.tools.check.report import as_dict as check_dict
    from hmmirror.tools.check.report import run_or_stopped

    start = time.monotonic()
    live = sys.stderr if as_json else sys.stdout
    # The bars go to stderr, only where it is a terminal, and never under -j.
    report = uvloop.run(run_demo(duration, seed, live, Progress(sys.stderr, "demo", not as_json)))
    if not as_json:
        print_report(report, seed, sys.stdout)
    checked = None
    if check_duration > 0:
        live.write(f"\nchecker: seed {seed}, 3 mlx5-model agents, {check_duration:g} s\n")
        opts = Options(seed=seed, duration=check_duration, agents=3)
        bar = Progress(sys.stderr, "check", not as_json)
        outcome = run_or_stopped(Checker(opts, live, bar), "demo")
        if isinstance(outcome, int):
            return outcome
        checked = outcome
        if not as_json:
            print_check(checked, sys.stdout)
    elapsed = time.monotonic() - start
    if as_json:
        entry = as_dict(report, seed)
        entry["elapsed_s"] = round(elapsed, 3)
        entry["check"] = check_dict(checked) if checked is not None else None
        sys.stdout.write(json.dumps(entry) + "\n")
        sys.stdout.flush()
    else:
        sys.stdout.write(f"finished in {elapsed:.1f} s\n")
    return 1 if report.violations or (checked is not None and checked.violations) else 0
