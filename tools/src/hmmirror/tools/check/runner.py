"""The coherence checker: hmmd, a stamped target, N agent processes, two oracles, a report.

One run, all real processes on real sockets:

1. hmmd starts on a private ``ipc://`` socket; the target (``check.target``)
   starts with the seed; N agents (``check.agent``) register ODP MRs over its arena.
2. Rounds: agents run their workload while the target runs a batch of
   operations; then everyone pauses, hmmd is let catch up (counters still, no
   invalidation active), and the **translation oracle** compares every VALID
   MTT entry of every agent with ``/proc/PID/pagemap``, read here.
3. The target exits mid-workload (agents are faulting and moving data); every
   agent must see RELEASE.
4. The **data oracle** replays the target's change log and the agents' writes
   and judges every READ the agents made (``stamps.DataOracle``).

A scenario (``check.scenarios``) injects a fault into that run and adds its own
assertions; its failures count as violations. The seed fixes the target's
operations and each agent's choices; the interleaving with hmmd's polling is
the machine's. Every wait has a deadline, every child is killed in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import IO, Any

import numpy as np
from hmmirror.client.errors import AgentError
from hmmirror.client.session import status
from hmmirror.testing.hmmd import HmmdProcess, die_with_parent, start_hmmd_async
from hmmirror.testing.quiesce import quiesce
from hmmirror.tools.check.atomics import AtomicOracle
from hmmirror.tools.check.child import Child, ChildDied
from hmmirror.tools.check.stamps import DataOracle, load
from hmmirror.tools.check.tally import LogTally, cpu_seconds
from hmmirror.tools.oracle import check_table
from hmmirror.tools.progress import Progress

#: Mirrors' retry budget (``proto.RETRY_BUDGET``) plus scheduling slack on a busy host.
LATENCY_SLACK = 2.5


async def _nothing(checker: Checker, *_: int) -> None:
    """No injection."""


@dataclass(frozen=True)
class Scenario:
    """A fault injected into the run, and what must hold afterwards."""

    help: str
    agent_args: Callable[[int, float], list[str]] = lambda i, deadline: []
    during: Callable[[Checker, int], Coroutine[Any, Any, None]] = _nothing
    """Run alongside round ``n`` (the target's batch); may signal processes."""
    after: Callable[[Checker], Coroutine[Any, Any, None]] = _nothing
    """Run once the target exited, before the data oracle; may add phases and violations."""
    self_test: bool = False
    """A deliberately broken run: violations are the expected outcome."""
    min_agents: int = 1
    """Agents the scenario needs (``slow-agent`` slows agent-0 and agent-1 differently)."""
    heartbeat_ms: int = 200
    """hmmd's heartbeat (the lease is three): ``hwm`` gives its flood a longer lease."""
    min_ack_deadline: float = 0.0
    """The least ack deadline the scenario runs with (``Options.ack_deadline`` if longer)."""


#: The scenarios by name: ``check.scenarios`` registers them (it drives a Checker, so the
#: runner, below it, cannot import it).
SCENARIOS: dict[str, Scenario] = {}


@dataclass
class Options:
    """What to run."""

    seed: int = 1
    duration: float = 10.0
    ops: int = 3000
    agents: int = 3
    scenario: str = "none"
    ack_deadline: float = 1.0
    round_ops: int = 80
    min_rounds: int = 2
    """Quiescent checks a run makes even when ``duration`` has passed (a loaded host, or slow
    acks, can make the first round take it all)."""
    keep: bool = False
    """Keep the run's directory (logs, hmmd's stderr) and print where it is."""
    until_judged: int = 0
    """Stop the rounds once this many operations are judged or sure to be (translations
    checked, plus the READs in the agents' logs); 0: no such stop. Atomics are judged on top."""


@dataclass
class Report:
    """A run's figures and verdict."""

    seed: int
    scenario: str
    rounds: int = 0
    elapsed: float = 0.0
    target_ops: dict[str, int] = field(default_factory=dict)
    agents: list[dict[str, Any]] = field(default_factory=list)
    hmmd: dict[str, int | float | str] = field(default_factory=dict)
    reads_judged: int = 0
    translations_checked: int = 0
    atomics_judged: int = 0
    """FETCH_ADD and CAS results judged by the atomic oracle (``check.atomics``)."""
    logged_to_judge: int = 0
    """READs in the agents' logs when the rounds stopped (``tally.LogTally``)."""
    checker_cpu_s: float = 0.0
    """CPU seconds of the checker process itself (its oracles and its driving)."""
    violations: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    logs: str = ""
    """The run's directory when it was kept (``--keep``, or any violation); "" once removed."""

    def by_kind(self) -> Counter[str]:
        """Violations counted by kind."""
        return Counter(kind for kind, _ in self.violations)


@dataclass
class Phase:
    """One target process and the logs judged against it."""

    target: Child
    pid: int
    start_time: int
    base: int
    size: int
    log: str
    dma_logs: list[str]
    t_start: int


class Checker:
    """One checker run; ``run()`` returns the report."""

    def __init__(
        self, opts: Options, out: IO[str] | None = None, progress: Progress | None = None
    ) -> None:
        self.opts = opts
        self.out = out
        self.progress = progress or Progress(None, "check")
        self.phase = "starting hmmd, the target and the agents"
        """What the run is doing now, for the progress bar."""
        self.scenario = SCENARIOS[opts.scenario]
        if opts.ack_deadline < self.scenario.min_ack_deadline:
            self.opts = opts = replace(opts, ack_deadline=self.scenario.min_ack_deadline)
        if opts.agents < self.scenario.min_agents:
            raise ValueError(
                f"scenario {opts.scenario} needs at least {self.scenario.min_agents} agents"
            )
        self.report = Report(opts.seed, opts.scenario)
        self.dir = tempfile.mkdtemp(prefix="hmmchk-", dir="/tmp")
        self.endpoint = f"ipc://{self.dir}/hmmd.sock"
        self.hmmd: HmmdProcess | None = None
        self.hmmd_log = os.path.join(self.dir, "hmmd.log")
        self.agents: list[Child] = []
        self.figures: dict[int, dict[str, Any]] = {}
        self.phases: list[Phase] = []
        self.ops_done = 0
        self.tally = LogTally()

    # --- reporting -----------------------------------------------------------------------------

    def violation(self, kind: str, detail: str) -> None:
        """Record a violation (or a scenario's failed assertion)."""
        self.report.violations.append((kind, detail))
        self.say(f"VIOLATION {kind}: {detail}")

    def say(self, text: str) -> None:
        """A progress line, if there is an output."""
        if self.out is not None:
            with self.progress.aside():
                self.out.write(text + "\n")
                self.out.flush()

    # --- processes -----------------------------------------------------------------------------

    async def start_hmmd(self) -> None:
        """Start (or restart: the log is appended to) hmmd on the run's endpoint; once ready."""
        self.hmmd = await start_hmmd_async(
            self.endpoint,
            ["--ack-deadline", f"{self.opts.ack_deadline}s",
             "--heartbeat", f"{self.scenario.heartbeat_ms}ms"],
            log_path=self.hmmd_log, append=True, deadline=15, pdeathsig=True,
        )  # fmt: skip

    async def start_target(self, seed: int) -> Phase:
        """Start a target; return its phase record."""
        # Here, not at the top: hmmctl (which imports this module for its --help) must
        # start where the daemon's distribution is not installed, and say what is missing.
        from hmmirror.daemon.linux.procfs import start_time

        n = len(self.phases)
        log = os.path.join(self.dir, f"target-{n}.log")
        t_start = time.monotonic_ns()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hmmirror.tools.check.target", str(seed), log,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            preexec_fn=die_with_parent,
        )  # fmt: skip
        child = Child(f"target-{n}", proc)
        try:
            words = (await child.line(15)).split()
            if words[:1] != ["ready"]:
                raise RuntimeError(f"the target said {words!r}")
            phase = Phase(
                child, proc.pid, start_time(proc.pid), int(words[1], 16), int(words[2]), log,
                [os.path.join(self.dir, f"agent-{i}.{n}.dma") for i in range(self.opts.agents)],
                t_start,
            )  # fmt: skip
        except BaseException:
            child.kill()  # not yet in self.phases, which stop_all reaps
            await child.reap()
            raise
        self.phases.append(phase)
        return phase

    async def start_agents(self, phase: Phase) -> None:
        """Start the agents on ``phase``'s target."""
        for i in range(self.opts.agents):
            argv = [
                sys.executable, "-m", "hmmirror.tools.check.agent", self.endpoint, str(i),
                str(self.opts.seed), str(phase.pid), str(phase.start_time), hex(phase.base),
                str(phase.size), phase.dma_logs[i],
                *self.scenario.agent_args(i, self.opts.ack_deadline),
            ]  # fmt: skip
            err = open(os.path.join(self.dir, f"agent-{i}.stderr"), "ab")  # noqa: SIM115
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=err, preexec_fn=die_with_parent,
                )  # fmt: skip
            finally:
                err.close()
            self.agents.append(Child(f"agent-{i}", proc))
        for agent in self.agents:
            hello = json.loads(await agent.line(15))
            if not hello.get("ready"):
                raise RuntimeError(f"{agent.name} said {hello!r}")

    async def ask_all(self, text: str) -> dict[int, dict[str, Any]]:
        """Ask every live agent; an agent that died is noted, not waited for."""
        answers: dict[int, dict[str, Any]] = {}
        for i, agent in enumerate(self.agents):
            if not agent.alive:
                continue
            with contextlib.suppress(ChildDied):
                answers[i] = await agent.ask(text)
        return answers

    # --- the run ---------------------------------------------------------------------------------

    async def quiesce(self) -> None:
        """Wait until hmmd settled (:func:`hmmirror.testing.quiesce.quiesce`); else a violation."""
        limit = 10 + 2 * self.opts.ack_deadline
        settled = await quiesce(self.endpoint, limit)
        if not settled:
            self.violation("not quiescent", f"hmmd never settled in {limit:.0f} s: {settled.why}")

    async def check_translations(self, phase: Phase) -> None:
        """The translation oracle, at a quiescent point (target between commands, agents paused)."""
        for i, answer in (await self.ask_all("table")).items():
            if not answer.get("table") or int(answer["pid"]) != phase.pid:
                continue
            table = np.frombuffer(bytes.fromhex(answer["table"]), dtype=np.uint64)
            if not answer.get("physical", True):
                # Frame tokens cannot be compared with the pagemap: say so, never pass quietly.
                self.violation(
                    "oracle",
                    f"agent-{i} was given frame tokens, not physical frames: its translations "
                    "cannot be checked (the checker's agents must connect as root over ipc)",
                )
                continue
            self.report.translations_checked += int(np.count_nonzero(table >> np.uint64(63)))
            try:
                found = check_table(int(answer["mirror"]), phase.pid, int(answer["start"]), table)
            except OSError as exc:
                self.violation("oracle", f"cannot read the pagemap of {phase.pid}: {exc}")
                continue
            for v in found[:5]:
                self.violation(
                    "stale translation",
                    f"agent-{i} mirror {v.mirror} at {v.addr:#x}: {v.kind} "
                    f"(entry {v.entry:#x}, pagemap {v.live:#x})",
                )
            if len(found) > 5:
                for _ in found[5:]:
                    self.report.violations.append(("stale translation", "(more)"))

    async def round(self, phase: Phase, n: int) -> None:
        """One round: workload and target ops together, then the quiescent check."""
        await self.ask_all("go")
        count = min(self.opts.round_ops, self.opts.ops - self.ops_done)
        phase.target.send(f"run {count}")

        async def target_done() -> None:
            words = (await phase.target.line(60)).split()
            for item in words[2:]:
                k, v = item.split("=")
                self.report.target_ops[k] = int(v)

        # A TaskGroup: if one side fails, the other (which may signal processes or restart
        # hmmd) is cancelled before stop_all runs, not left running beside it.
        async with asyncio.TaskGroup() as group:
            group.create_task(target_done())
            group.create_task(self.scenario.during(self, n))
        self.ops_done += count
        for i, figures in (await self.ask_all("pause")).items():
            self.figures[i] = figures
        await self.quiesce()
        await self.check_translations(phase)
        self.report.rounds += 1
        self.report.logged_to_judge = self.tally.update(phase.dma_logs)
        self.say(
            f"round {n}: {self.ops_done} target ops, {self.judged()} operations judged or "
            f"logged to judge, {len(self.report.violations)} violations so far"
        )

    async def exit_target(self, phase: Phase) -> None:
        """The target exits in the middle of the agents' faults and DMAs; all must see RELEASE."""
        await self.ask_all("go")
        phase.target.send("run 100000")
        await asyncio.sleep(0.3)
        phase.target.kill(signal.SIGUSR1)  # exits between two operations, log flushed
        rc = await phase.target.reap(10)
        if rc != 0:
            self.violation("target", f"the target exited with {rc}")
        loop = asyncio.get_running_loop()
        t_exit = loop.time()
        await asyncio.sleep(0.2)
        for i, figures in (await self.ask_all("pause")).items():
            self.figures[i] = figures
        pending = set(i for i, a in enumerate(self.agents) if a.alive)
        while pending and loop.time() - t_exit < 5:
            for i, answer in (await self.ask_all("table")).items():
                if answer.get("released") or answer.get("mirror", -1) < 0:
                    pending.discard(i)
            if pending:
                await asyncio.sleep(0.1)
        for i in sorted(pending):
            self.violation("no RELEASE", f"agent-{i} still holds a live mirror 5 s after exit")

    def judge_data(self, phase: Phase) -> None:
        """The data oracle over one phase's logs."""
        oracle = DataOracle(phase.base, phase.size // 4096, phase.t_start)
        dma = [load(p) for p in phase.dma_logs if os.path.exists(p)]
        target = load(phase.log)
        oracle.feed(target, dma)
        found = oracle.judge(dma)
        self.report.reads_judged += oracle.reads
        for v in found[:5]:
            self.violation(f"data: {v.kind}", v.text())
        for v in found[5:]:
            self.report.violations.append((f"data: {v.kind}", "(more)"))
        atomics = AtomicOracle(phase.base, phase.size // 4096, phase.t_start)
        wrong = atomics.judge(target, dma)
        self.report.atomics_judged += atomics.judged
        for a in wrong[:5]:
            self.violation(f"atomic: {a.kind}", a.detail)
        for a in wrong[5:]:
            self.report.violations.append((f"atomic: {a.kind}", "(more)"))

    def judged(self) -> int:
        """Operations judged so far, or sure to be judged by the data oracle at the end."""
        return self.report.translations_checked + self.report.logged_to_judge

    def judged_enough(self) -> bool:
        """Whether ``--until-judged`` is reached."""
        return 0 < self.opts.until_judged <= self.judged()

    def show_progress(self, running: float | None) -> None:
        """Redraw the bar: rounds run against both bounds (``--duration``, ``--ops``),
        whichever comes first; ``running`` is None before the rounds start."""
        if running is None:
            self.progress.update(0.0, self.phase)
            return
        o = self.opts
        fraction = max(min(running / o.duration, 1.0), self.ops_done / o.ops)
        left = max(o.duration - running, 0.0)
        if self.ops_done:
            left = min(left, running * (o.ops - self.ops_done) / self.ops_done)
        judged = self.judged()
        if o.until_judged and judged:
            fraction = max(fraction, min(judged / o.until_judged, 1.0))
            left = min(left, running * max(o.until_judged - judged, 0) / judged)
        if self.phase:
            self.progress.update(1.0 if self.report.rounds >= o.min_rounds else fraction,
                                 self.phase)  # fmt: skip
            return
        judging = f", {judged}/{o.until_judged} judged" if o.until_judged else ""
        self.progress.update(
            fraction,
            f"round {self.report.rounds}, {self.ops_done}/{o.ops} ops{judging}, "
            f"{running:.0f}/{o.duration:g} s",
            left,
        )

    async def _tick(self, since: list[float | None]) -> None:
        """Redraw the bar every quarter second (``since[0]``: when the rounds started)."""
        loop = asyncio.get_running_loop()
        while True:
            start = since[0]
            self.show_progress(None if start is None else loop.time() - start)
            await asyncio.sleep(0.25)

    async def run(self) -> Report:
        """The whole run, bounded by ``--duration`` and ``--ops``; children killed in the end."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        since: list[float | None] = [None]
        ticker = asyncio.ensure_future(self._tick(since)) if self.progress.enabled else None
        # The rounds, then the data oracle over every log: a long run has more to judge.
        bound = self.opts.duration * 1.1 + 120
        whole_run = asyncio.timeout(bound)
        finished = False
        # SIGTERM ends the run as Ctrl-C does: the children are stopped and reaped below.
        # (SIGKILL cannot be caught: they are started with PR_SET_PDEATHSIG for that.)
        me = asyncio.current_task()
        if me is not None:
            loop.add_signal_handler(signal.SIGTERM, me.cancel)
        try:
            async with whole_run:
                await self.start_hmmd()
                phase = await self.start_target(self.opts.seed)
                await self.start_agents(phase)
                self.say(
                    f"started hmmd, target {phase.pid} and {len(self.agents)} agents "
                    f"in {loop.time() - t0:.1f} s"
                )
                t0 = loop.time()
                since[0], self.phase = t0, ""
                n = 0
                while n < self.opts.min_rounds or (
                    loop.time() - t0 < self.opts.duration
                    and self.ops_done < self.opts.ops
                    and not self.judged_enough()
                ):
                    await self.round(phase, n)
                    n += 1
                self.phase = "the target exits; judging every READ"
                await self.exit_target(phase)
                await self.scenario.after(self)
                for p in self.phases:
                    self.judge_data(p)
                with contextlib.suppress(AgentError):
                    self.report.hmmd = await status(self.endpoint, 2.0)
            finished = True
        except TimeoutError as exc:
            if whole_run.expired():
                self.violation("timeout", f"the run did not finish in {bound:.0f} s")
            else:  # one step's own deadline (a child's answer, hmmd's start-up)
                self.violation("checker error", f"a step timed out: {exc!r}")
            finished = True
        except (ChildDied, RuntimeError, AgentError, OSError) as exc:
            self.violation("checker error", f"{type(exc).__name__}: {exc}")
            finished = True
        finally:
            if me is not None:
                loop.remove_signal_handler(signal.SIGTERM)
            if ticker is not None:
                ticker.cancel()
                # A bar that could not be drawn (the terminal went away) is no failure.
                with contextlib.suppress(asyncio.CancelledError, OSError, ValueError):
                    await ticker
            self.progress.close()
            await self.stop_all()
            self.report.elapsed = loop.time() - t0
            self.report.checker_cpu_s = cpu_seconds()
            self.report.agents = [self.figures.get(i, {}) for i in range(len(self.agents))]
            if self.opts.keep or self.report.violations or not finished:
                self.report.notes.append(f"logs kept in {self.dir}")
                self.report.logs = self.dir
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
        return self.report

    async def stop_all(self) -> None:
        """Agents get ``exit`` then SIGKILL; targets and hmmd are killed; all are reaped."""
        for agent in self.agents:
            with contextlib.suppress(ChildDied, OSError, RuntimeError):
                agent.send("exit")
        for agent in self.agents:
            with contextlib.suppress(ProcessLookupError, TimeoutError):
                await agent.reap(5)
        for phase in self.phases:
            phase.target.kill()
            with contextlib.suppress(TimeoutError):
                await phase.target.reap(5)
        if self.hmmd is not None:
            await self.hmmd.stop_async(5)
