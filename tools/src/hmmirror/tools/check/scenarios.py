"""The fault-injection scenarios the checker runs: each injects a fault and says what must hold.

A scenario's ``agent_args`` start agents with test-only knobs (slow acks, a
broken ack, a tiny receive queue); ``during`` runs alongside a round of the
target's operations and may signal processes (SIGKILL, SIGSTOP, hmmd's
restart); ``after`` runs once the target exited and adds its own assertions,
whose failures count as violations. ``self_test`` scenarios are deliberately
broken runs that must end with violations: they prove the oracles can fail.

They register in ``runner.SCENARIOS`` when this module is imported (the
``hmmirror.tools.check`` package does), so the runner never imports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

from hmmirror.client.errors import AgentError
from hmmirror.client.session import inventory, status
from hmmirror.tools.check.runner import LATENCY_SLACK, SCENARIOS, Checker, Scenario

__all__ = ["SCENARIOS"]  # the runner's registry, filled here


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
    await checker.hmmd.stop_async(5)  # reaps it and closes its pipe
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
        flood = await checker.agents[0].ask("flood 400000", 45)
        checker.report.notes.append(f"flood: {flood}")
        if not flood.get("evicted") or flood.get("lost"):
            checker.violation(
                "scenario", f"the flood did not end in agent-0's eviction on its own connection: "
                f"{flood}",
            )  # fmt: skip


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


SCENARIOS.update(
    {
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
            "agent-0 stops reading and floods hmmd with STATUS requests until hmmd's send "
            "queue to it is full; hmmd must evict it, not block or drop INVALIDATEs silently",
            agent_args=_args(a0=["--small-queue"]),
            during=_hwm_during,
            after=_hwm_after,
            # The flood must fill hmmd's queue before agent-0's lease, or its missing ACKs,
            # end the session by another path: on a busy machine that can take seconds.
            heartbeat_ms=1000,
            min_ack_deadline=3.0,
        ),
        "slow-agent": Scenario(
            "agent-0 acks after 0.6x the ack deadline (kept), agent-1 after 1.5x (evicted, "
            "registers again)",
            agent_args=lambda i, d: {
                0: ["--ack-delay", f"{0.6 * d:.3f}"],
                1: ["--ack-delay", f"{1.5 * d:.3f}"],
            }.get(i, []),
            after=_slow_after,
            min_agents=2,
        ),
        "broken-ack": Scenario(
            "SELF-TEST: agent-0 acks INVALIDATE before zapping; the translation oracle must "
            "flag it",
            agent_args=_args(a0=["--broken-ack"]),
            self_test=True,
        ),
        "corrupt-read": Scenario(
            "SELF-TEST: agent-0 logs wrong data for some READs; the data oracle must flag it",
            agent_args=_args(a0=["--corrupt-reads"]),
            self_test=True,
        ),
        "lie-atomic": Scenario(
            "SELF-TEST: agent-0 logs a neighbour's value (old + 1 or old - 1) for some "
            "FETCH_ADDs; the atomic oracle must flag it",
            agent_args=_args(a0=["--lie-atomics"]),
            self_test=True,
        ),
        "lie-write": Scenario(
            "SELF-TEST: agent-0 logs the WRITEs hmmd refused as landed; the data oracle must "
            "flag them",
            agent_args=_args(a0=["--lie-writes"]),
            self_test=True,
        ),
        "write-shared": Scenario(
            "SELF-TEST: agent-0 puts WRITE into the zero-page entries hmmd hands it in writable "
            "private VMAs, a WRITE entry on a page shared copy-on-write; the translation oracle "
            "must flag it",
            agent_args=_args(a0=["--write-shared"]),
            self_test=True,
        ),
    }
)
