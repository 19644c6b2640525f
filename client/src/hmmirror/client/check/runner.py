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

A scenario (``SCENARIOS``) injects a fault into that run and adds its own
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from hmmirror.client.check.stamps import DataOracle, describe, load
from hmmirror.client.errors import AgentError
from hmmirror.client.oracle import check_table
from hmmirror.client.session import inventory, status

#: Seconds one agent command may take (``pause`` waits for in-flight operations).
COMMAND_DEADLINE = 15.0
#: Mirrors' retry budget (``mirror.RETRY_BUDGET``) plus scheduling slack on a busy host.
LATENCY_SLACK = 2.5


class ChildDied(Exception):
    """A child process closed its stdout (exited, or was killed)."""


class Child:
    """A child process that answers one line per command."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc

    @property
    def pid(self) -> int:
        """The child's pid."""
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """Still running."""
        return self.proc.returncode is None

    async def line(self, timeout: float = COMMAND_DEADLINE) -> str:
        """The next stdout line; ChildDied on EOF, TimeoutError past ``timeout``."""
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            raise ChildDied(f"{self.name} (pid {self.pid}) exited")
        return raw.decode().rstrip("\n")

    def send(self, text: str) -> None:
        """Write one command line."""
        assert self.proc.stdin is not None
        if self.proc.stdin.is_closing():
            raise ChildDied(f"{self.name} (pid {self.pid}) exited")
        self.proc.stdin.write(text.encode() + b"\n")

    async def ask(self, text: str, timeout: float = COMMAND_DEADLINE) -> dict[str, Any]:
        """Send a command and return its JSON answer."""
        self.send(text)
        return dict(json.loads(await self.line(timeout)))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the child if it still runs."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def reap(self, timeout: float = 5.0) -> int | None:
        """Wait for the child to exit (SIGKILL after ``timeout``); its return code."""
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.kill()
            return await asyncio.wait_for(self.proc.wait(), 5.0)


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
    keep: bool = False
    """Keep the run's directory (logs, hmmd's stderr) and print where it is."""


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
    violations: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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


def start_time_of(pid: int) -> int:
    """Field 22 of /proc/PID/stat: the process's start time in clock ticks."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


class Checker:
    """One checker run; ``run()`` returns the report."""

    def __init__(self, opts: Options, out: IO[str] | None = None) -> None:
        self.opts = opts
        self.out = out
        self.scenario = SCENARIOS[opts.scenario]
        self.report = Report(opts.seed, opts.scenario)
        self.dir = tempfile.mkdtemp(prefix="hmmchk-", dir="/tmp")
        self.endpoint = f"ipc://{self.dir}/hmmd.sock"
        self.hmmd: asyncio.subprocess.Process | None = None
        self.hmmd_log = os.path.join(self.dir, "hmmd.log")
        self.agents: list[Child] = []
        self.figures: dict[int, dict[str, Any]] = {}
        self.phases: list[Phase] = []
        self.ops_done = 0

    # --- reporting -----------------------------------------------------------------------------

    def violation(self, kind: str, detail: str) -> None:
        """Record a violation (or a scenario's failed assertion)."""
        self.report.violations.append((kind, detail))
        self.say(f"VIOLATION {kind}: {detail}")

    def say(self, text: str) -> None:
        """A progress line, if there is an output."""
        if self.out is not None:
            self.out.write(text + "\n")
            self.out.flush()

    # --- processes -----------------------------------------------------------------------------

    async def start_hmmd(self) -> None:
        """Start (or restart) hmmd on the run's endpoint; return once it is ready."""
        log = open(self.hmmd_log, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.hmmd = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hmmirror.daemon", "run", "--endpoint", self.endpoint,
                "--ack-deadline", f"{self.opts.ack_deadline}s", "--heartbeat", "200ms",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log,
            )  # fmt: skip
        finally:
            log.close()
        assert self.hmmd.stdout is not None
        line = await asyncio.wait_for(self.hmmd.stdout.readline(), 15)
        if not line.startswith(b"hmmd ready"):
            raise RuntimeError(f"hmmd did not start (said {line!r}); see {self.hmmd_log}")

    async def start_target(self, seed: int) -> Phase:
        """Start a target; return its phase record."""
        n = len(self.phases)
        log = os.path.join(self.dir, f"target-{n}.log")
        t_start = time.monotonic_ns()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hmmirror.client.check.target", str(seed), log,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        child = Child(f"target-{n}", proc)
        words = (await child.line(15)).split()
        if words[0] != "ready":
            raise RuntimeError(f"the target said {words!r}")
        phase = Phase(
            child, proc.pid, start_time_of(proc.pid), int(words[1], 16), int(words[2]), log,
            [os.path.join(self.dir, f"agent-{i}.{n}.dma") for i in range(self.opts.agents)],
            t_start,
        )  # fmt: skip
        self.phases.append(phase)
        return phase

    async def start_agents(self, phase: Phase) -> None:
        """Start the agents on ``phase``'s target."""
        for i in range(self.opts.agents):
            argv = [
                sys.executable, "-m", "hmmirror.client.check.agent", self.endpoint, str(i),
                str(self.opts.seed), str(phase.pid), str(phase.start_time), hex(phase.base),
                str(phase.size), phase.dma_logs[i],
                *self.scenario.agent_args(i, self.opts.ack_deadline),
            ]  # fmt: skip
            err = open(os.path.join(self.dir, f"agent-{i}.stderr"), "ab")  # noqa: SIM115
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=err,
                )  # fmt: skip
            finally:
                err.close()
            self.agents.append(Child(f"agent-{i}", proc))
        for agent in self.agents:
            hello = json.loads(await agent.line(15))
            if not hello.get("ready"):
                raise RuntimeError(f"{agent.name} said {hello!r}")

    def live_agents(self) -> list[Child]:
        """Agents still running."""
        return [a for a in self.agents if a.alive]

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
        """Wait until hmmd's counters are still for two looks in a row and nothing is active."""
        last: tuple[object, ...] | None = None
        stable = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10 + 2 * self.opts.ack_deadline
        while loop.time() < deadline:
            await asyncio.sleep(0.1)  # two of these exceed the slowest watcher poll (50 ms)
            try:
                st = await status(self.endpoint, 2.0)
                mms, _ = await inventory(self.endpoint, 2.0)
            except AgentError:
                stable, last = 0, None
                continue
            busy = any(int(m["active"]) or int(m["seq"]) % 2 for m in mms)
            now = (st["invalidations"], st.get("faults"), st.get("evictions"))
            stable = stable + 1 if now == last and not busy else 0
            last = now
            if stable >= 2:
                return
        self.violation("not quiescent", f"hmmd never settled in {deadline:.0f} s")

    async def check_translations(self, phase: Phase) -> None:
        """The translation oracle, at a quiescent point (target between commands, agents paused)."""
        for i, answer in (await self.ask_all("table")).items():
            if not answer.get("table") or int(answer["pid"]) != phase.pid:
                continue
            table = np.frombuffer(bytes.fromhex(answer["table"]), dtype=np.uint64)
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

        await asyncio.gather(target_done(), self.scenario.during(self, n))
        self.ops_done += count
        for i, figures in (await self.ask_all("pause")).items():
            self.figures[i] = figures
        await self.quiesce()
        await self.check_translations(phase)
        self.report.rounds += 1
        self.say(
            f"round {n}: {self.ops_done} target ops, "
            f"{len(self.report.violations)} violations so far"
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
        oracle.feed(load(phase.log), dma)
        found = oracle.judge(dma)
        self.report.reads_judged += oracle.reads
        for v in found[:5]:
            live = ", ".join(describe(x) for x in v.live) or "nothing"
            self.violation(
                f"data: {v.kind}",
                f"READ at {v.addr:#x} over [{v.t0}, {v.t1}] ns got {describe(v.got)}; "
                f"live then: {live}",
            )
        for v in found[5:]:
            self.report.violations.append((f"data: {v.kind}", "(more)"))

    async def run(self) -> Report:
        """The whole run, bounded by ``--duration`` and ``--ops``; children killed in the end."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            async with asyncio.timeout(self.opts.duration + 120):
                await self.start_hmmd()
                phase = await self.start_target(self.opts.seed)
                await self.start_agents(phase)
                self.say(
                    f"started hmmd, target {phase.pid} and {len(self.agents)} agents "
                    f"in {loop.time() - t0:.1f} s"
                )
                t0 = loop.time()
                n = 0
                while n == 0 or (
                    loop.time() - t0 < self.opts.duration and self.ops_done < self.opts.ops
                ):
                    await self.round(phase, n)
                    n += 1
                await self.exit_target(phase)
                await self.scenario.after(self)
                for p in self.phases:
                    self.judge_data(p)
                with contextlib.suppress(AgentError):
                    self.report.hmmd = await status(self.endpoint, 2.0)
        except TimeoutError:
            self.violation("timeout", f"the run did not finish in {self.opts.duration + 120:.0f} s")
        finally:
            await self.stop_all()
            self.report.elapsed = loop.time() - t0
            self.report.agents = [self.figures.get(i, {}) for i in range(len(self.agents))]
            if self.opts.keep or self.report.violations:
                self.report.notes.append(f"logs kept in {self.dir}")
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
        if self.hmmd is not None and self.hmmd.returncode is None:
            self.hmmd.terminate()
            try:
                await asyncio.wait_for(self.hmmd.wait(), 5)
            except TimeoutError:
                self.hmmd.kill()
                await self.hmmd.wait()


# --- scenarios -----------------------------------------------------------------------------


async def _nothing(checker: Checker, *_: int) -> None:
    """No injection."""


@dataclass(frozen=True)
class Scenario:
    """A fault injected into the run, and what must hold afterwards."""

    help: str
    agent_args: Callable[[int, float], list[str]] = lambda i, deadline: []
    during: Callable[[Checker, int], Awaitable[None]] = _nothing
    """Run alongside round ``n`` (the target's batch); may signal processes."""
    after: Callable[[Checker], Awaitable[None]] = _nothing
    """Run once the target exited, before the data oracle; may add phases and violations."""
    self_test: bool = False
    """A deliberately broken run: violations are the expected outcome."""


def _latency_bound(checker: Checker, victims: set[int]) -> None:
    """No agent but the victims waited longer than the ack deadline (plus retry budget) per op."""
    bound = checker.opts.ack_deadline + LATENCY_SLACK
    for i, figures in checker.figures.items():
        if i in victims or "max_op_s" not in figures:
            continue
        if float(figures["max_op_s"]) > bound:
            checker.violation(
                "blocked", f"agent-{i} waited {figures['max_op_s']} s for one operation "
                f"(> ack deadline {checker.opts.ack_deadline} s + {LATENCY_SLACK} s)",
            )  # fmt: skip


async def _kill_during(checker: Checker, n: int) -> None:
    if n == 1:
        await checker.agents[0].ask("arm-suicide")


async def _kill_after(checker: Checker) -> None:
    rc = await checker.agents[0].reap(1)
    if rc != -signal.SIGKILL:
        checker.violation("scenario", f"agent-0 was to die of SIGKILL mid-ack; it exited {rc}")
    _latency_bound(checker, {0})


async def _stop_during(checker: Checker, n: int) -> None:
    if n == 1:
        checker.agents[0].kill(signal.SIGSTOP)
        await asyncio.sleep(2 * checker.opts.ack_deadline)
        checker.agents[0].kill(signal.SIGCONT)


async def _stop_after(checker: Checker) -> None:
    if int(checker.figures.get(0, {}).get("evictions", 0)) < 1:
        checker.violation("scenario", "agent-0 was stopped past its deadline but never evicted")
    _latency_bound(checker, {0})


async def _restart_during(checker: Checker, n: int) -> None:
    if n != 1:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3
    active = False
    while loop.time() < deadline and not active:  # kill it mid-invalidation
        with contextlib.suppress(AgentError):
            mms, _ = await inventory(checker.endpoint, 1.0)
            active = any(int(m["active"]) for m in mms)
        await asyncio.sleep(0.002)
    old = await status(checker.endpoint, 2.0)
    assert checker.hmmd is not None
    checker.hmmd.kill()
    await checker.hmmd.wait()
    checker.report.notes.append(
        f"hmmd SIGKILLed {'mid-invalidation' if active else 'with no invalidation seen active'}"
    )
    await checker.start_hmmd()
    new = await status(checker.endpoint, 2.0)
    if new["epoch"] == old["epoch"]:
        checker.violation("scenario", "the restarted hmmd kept its epoch")
    pending = set(range(len(checker.agents)))
    while pending and loop.time() < deadline + 15:
        for i, answer in (await checker.ask_all("table")).items():
            if answer.get("epoch") == new["epoch"] and answer.get("usable"):
                pending.discard(i)
        await asyncio.sleep(0.1)
    for i in sorted(pending):
        checker.violation("scenario", f"agent-{i} did not register again after the restart")


async def _hwm_during(checker: Checker, n: int) -> None:
    if n == 1:
        checker.report.notes.append(f"flood: {await checker.agents[0].ask('flood 40000', 30)}")


async def _hwm_after(checker: Checker) -> None:
    with open(checker.hmmd_log, errors="replace") as f:
        if "send queue full" not in f.read():
            checker.violation("scenario", "the flood never filled hmmd's queue to agent-0")
    _latency_bound(checker, {0})


async def _slow_after(checker: Checker) -> None:
    under, over = checker.figures.get(0, {}), checker.figures.get(1, {})
    if int(under.get("evictions", -1)) != 0:
        checker.violation("scenario", f"agent-0 acked in time but was evicted: {under}")
    if int(over.get("evictions", 0)) < 1:
        checker.violation("scenario", "agent-1 acked past its deadline but was never evicted")


async def _exit_after(checker: Checker) -> None:
    _latency_bound(checker, set())


async def _pid_reuse_after(checker: Checker) -> None:
    old = checker.phases[0]
    phase = None
    for _ in range(100):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(old.pid - 1))
        except OSError as exc:
            checker.violation("scenario", f"cannot steer pid allocation (ns_last_pid): {exc}")
            return
        phase = await checker.start_target(checker.opts.seed + 1)
        if phase.pid == old.pid:
            break
        phase.target.kill()
        await phase.target.reap()
        checker.phases.pop()
        phase = None
    if phase is None:
        checker.violation("scenario", f"could not get pid {old.pid} again in 100 tries")
        return
    checker.report.notes.append(
        f"pid {old.pid} reused: start time {old.start_time} -> {phase.start_time}"
    )
    for i, agent in enumerate(checker.agents):
        if not agent.alive:
            continue
        stale = await agent.ask(
            f"retarget {phase.pid} {old.start_time} {phase.base} {phase.size} {phase.dma_logs[i]}"
        )
        if "error" not in stale:
            checker.violation("pid reuse", f"agent-{i} registered on the new process by the old "
                              f"(pid, start time): {stale}")  # fmt: skip
        fresh = await agent.ask(
            f"retarget {phase.pid} {phase.start_time} {phase.base} {phase.size} {phase.dma_logs[i]}"
        )
        if "error" in fresh:
            checker.violation("pid reuse", f"agent-{i} cannot register on the new process: {fresh}")
    for n in range(2):
        await checker.round(phase, 100 + n)
    await checker.exit_target(phase)


def _args(**per_agent: list[str]) -> Callable[[int, float], list[str]]:
    """Agent arguments by index (``a0=[...]``)."""
    return lambda i, deadline: per_agent.get(f"a{i}", [])


SCENARIOS: dict[str, Scenario] = {
    "none": Scenario("no fault injected: the plain coherence check"),
    "agent-kill": Scenario(
        "agent-0 zaps an INVALIDATE and is SIGKILLed before its ACK; the others must not wait "
        "longer than the ack deadline",
        during=_kill_during,
        after=_kill_after,
    ),
    "agent-stop": Scenario(
        "agent-0 is SIGSTOPped for twice the ack deadline, then resumed: it is evicted, "
        "registers again, and nobody else waits past the deadline",
        during=_stop_during,
        after=_stop_after,
    ),
    "hmmd-restart": Scenario(
        "hmmd is SIGKILLed while an invalidation is in flight (agent-0 acks slowly) and "
        "restarted; agents register again and no translation survives",
        agent_args=_args(a0=["--ack-delay", "0.3"]),
        during=_restart_during,
    ),
    "target-exit": Scenario(
        "the target exits while faults (held by agent-0's slow acks) and DMAs are in flight",
        agent_args=_args(a0=["--ack-delay", "0.2"]),
        after=_exit_after,
    ),
    "pid-reuse": Scenario(
        "after the target exits a new process gets its pid: the old (pid, start time) must "
        "not reach it; a fresh registration is checked like the first",
        after=_pid_reuse_after,
    ),
    "hwm": Scenario(
        "agent-0 stops reading and floods hmmd with heartbeats until hmmd's send queue to it "
        "is full; hmmd must evict it, not block or drop INVALIDATEs silently",
        agent_args=_args(a0=["--small-queue"]),
        during=_hwm_during,
        after=_hwm_after,
    ),
    "slow-agent": Scenario(
        "agent-0 acks after 0.6x the ack deadline (kept), agent-1 after 1.5x (evicted, "
        "registers again)",
        agent_args=lambda i, d: {
            0: ["--ack-delay", f"{0.6 * d:.3f}"],
            1: ["--ack-delay", f"{1.5 * d:.3f}"],
        }.get(i, []),
        after=_slow_after,
    ),
    "broken-ack": Scenario(
        "SELF-TEST: agent-0 acks INVALIDATE before zapping; the translation oracle must flag it",
        agent_args=_args(a0=["--broken-ack"]),
        self_test=True,
    ),
    "corrupt-read": Scenario(
        "SELF-TEST: agent-0 logs wrong data for some READs; the data oracle must flag it",
        agent_args=_args(a0=["--corrupt-reads"]),
        self_test=True,
    ),
}


def print_report(report: Report, out: IO[str]) -> None:
    """The closing table: what ran, what was checked, what was found."""
    agents = report.agents

    slowest = max((float(a.get("max_op_s", 0)) for a in agents), default=0.0)

    def total(key: str) -> int:
        return sum(int(a.get(key, 0)) for a in agents)

    ops = sum(report.target_ops.values())
    rows: list[tuple[str, object]] = [
        ("scenario", report.scenario),
        ("seed", report.seed),
        ("elapsed", f"{report.elapsed:.1f} s"),
        ("rounds (quiescent checks)", report.rounds),
        ("target operations", ops),
        ("  by kind", " ".join(f"{k}={v}" for k, v in sorted(report.target_ops.items()))),
        ("agents", len(agents)),
        (
            "device reads / writes / atomics",
            f"{total('reads')} / {total('writes')} / {total('atomics')}",
        ),
        ("page faults (calls / pages)", f"{total('page_faults_handled')} / {total('page_faults')}"),
        ("prefetch (calls / pages)", f"{total('prefetches')} / {total('page_prefetch')}"),
        (
            "invalidations (hmmd / agents' zaps)",
            f"{report.hmmd.get('invalidations', '?')} / {total('page_invalidations_handled')}",
        ),
        ("STALE refusals (hmmd)", report.hmmd.get("stale", "?")),
        ("evictions (hmmd)", report.hmmd.get("evictions", "?")),
        ("refused / EBUSY (agents)", f"{total('refused')} / {total('busy')}"),
        ("slowest agent operation", f"{slowest:.3f} s"),
        ("translations checked", report.translations_checked),
        ("READs judged (data oracle)", report.reads_judged),
        ("violations", len(report.violations)),
    ]
    for kind, count in sorted(report.by_kind().items()):
        rows.append((f"  {kind}", count))
    width = max(len(k) for k, _ in rows)
    out.write("\nhmmirror coherence check\n" + "-" * (width + 30) + "\n")
    for key, value in rows:
        out.write(f"{key:<{width}}  {value}\n")
    for note in report.notes:
        out.write(f"note: {note}\n")
    if report.violations:
        out.write(f"replay: hmmctl check --seed {report.seed} --scenario {report.scenario}\n")
    out.flush()


def main(opts: Options, out: IO[str], progress: bool = True) -> int:
    """Run the check and print the report (progress lines too); 0 if no violation, else 1."""
    import uvloop

    if opts.scenario not in SCENARIOS:
        out.write(f"hmmctl check: no scenario {opts.scenario!r}; try --scenario list\n")
        return 2
    report = uvloop.run(Checker(opts, out if progress else None).run())
    print_report(report, out)
    return 1 if report.violations else 0
