"""The hmmirror side of benchmarks 1 and 2: hmmd, a target, N agents and the drivers.

``Ours`` brings up hmmd (the one launcher, ``hmmirror.testing.hmmd``), a populated target and N
agent processes (``invalidate_agents.py``) mirroring it, and tears all down on exit.
``drive_w1`` and ``drive_pipelined_interleaved`` run one measurement against ``Ours`` and the
baseline's ``Fanout`` in one event loop, alternating between them so both see the same machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baseline_fanout
import baseline_relay
from common import (
    PAGE,
    PY,
    Procs,
    cpu_seconds,
    percentile,
    read_line,
    spawn_target,
    start_daemon,
    tmpdir,
)

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_PAGES = 256  # the mirrored range: 1 MiB, populated
#: Benchmark 2's uncounted ramp-up before each block after the first (the pipeline refills).
RAMP_S = 0.1


# --------------------------------------------------------------------------- hmmirror side


class Ours:
    """Daemon + target + N hmmirror agents, all torn down on exit."""

    def __init__(self, n: int, daemon_args: list[str], agent_kind: str = "agent") -> None:
        self.n = n
        self.daemon_args = daemon_args
        self.agent_kind = agent_kind  # "agent" (hmmirror.client) or "rawagent" (diagnostic)

    def __enter__(self) -> Ours:
        self._tmp = tmpdir()
        d = self._tmp.__enter__()
        self.procs = Procs().__enter__()
        try:
            self.endpoint = f"ipc://{d}/hmmd.sock"
            self.daemon = start_daemon(self.procs, self.endpoint, d, self.daemon_args)
            self.target = spawn_target(self.procs, TARGET_PAGES * PAGE, populate=True)
            self.agents = []
            for i in range(self.n):
                self.agents.append(
                    self.procs.spawn(
                        [
                            PY,
                            os.path.join(HERE, "invalidate_agents.py"),
                            self.agent_kind,
                            self.endpoint,
                            f"bench-agent-{i}",
                            str(self.target.pid),
                            hex(self.target.addr),
                            str(TARGET_PAGES * PAGE),
                        ]
                    )
                )
            for a in self.agents:
                read_line(a, "agent ready", 30.0)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def agent_stats(self) -> list[dict[str, Any]]:
        out = []
        for a in self.agents:
            try:
                if a.stdin:
                    a.stdin.close()
                out.append(json.loads(read_line(a, "agent stats", 5.0).split(" ", 2)[2]))
                a.wait(5.0)  # let it unregister and say goodbye before the target goes away
            except Exception as exc:
                out.append({"error": str(exc)[:200]})
        return out

    def cpu(self) -> dict[str, float]:
        """CPU seconds (user + system, every thread) that hmmd, the agents and the driver (this
        process, which drives only one side at a time) used so far."""
        return {
            "hmmd": cpu_seconds(self.daemon.pid),
            "agents": sum(cpu_seconds(a.pid) for a in self.agents),
            "driver": cpu_seconds(os.getpid()),
        }

    def __exit__(self, *exc: Any) -> None:
        try:
            self.procs.__exit__(*exc)
            bad = self.daemon.problems() if hasattr(self, "daemon") else ""
            if bad:
                print(f"[hmmd log] {bad}", flush=True)
        finally:
            self._tmp.__exit__(*exc)


def cpu_per_invalidation(r: dict[str, Any], n: int) -> str:
    """Where the CPU went between ``cpu0`` and ``cpu1``, per invalidation of the ``n`` made
    then: hmmd's and the agents' (a note; the baseline's agents are not counted)."""
    if n <= 0:
        return "cpu per invalidation: -"
    c0, c1 = r["cpu0"], r["cpu1"]
    per = ", ".join(f"{k} {(c1[k] - c0[k]) / n * 1e6:.0f} us" for k in c0)
    return f"cpu per invalidation: {per}"


async def drive_w1(
    o: Ours, fan: baseline_fanout.Fanout, count: int, warmup: int, block: int
) -> dict[str, Any]:
    """W=1 on both sides in one event loop, alternating blocks of ``block`` invalidations
    (baseline block, then ours), so both see the same machine conditions."""
    from hmmirror.client import connect

    t = o.target
    lat: list[float] = []
    blat: list[float] = []
    pc = time.perf_counter
    fan.start()
    try:
        async with connect(o.endpoint, name="bench-driver") as s:
            st0 = await s.status()
            i = 0

            async def ours(k: int, keep: bool) -> None:
                nonlocal i
                for _ in range(k):
                    a = t.addr + (i % TARGET_PAGES) * PAGE
                    i += 1
                    t0 = pc()
                    await s.sync_range(t.pid, a, a + PAGE)
                    if keep:
                        lat.append((pc() - t0) * 1e6)

            async def base(k: int, keep: bool) -> None:
                nonlocal i
                for _ in range(k):
                    a = (i % TARGET_PAGES) * PAGE
                    i += 1
                    t0 = pc()
                    await fan.invalidate(1, a, a + PAGE)
                    if keep:
                        blat.append((pc() - t0) * 1e6)

            await base(warmup, False)
            await ours(warmup, False)
            cpu1 = cpu0 = dict.fromkeys(o.cpu(), 0.0)  # our blocks' CPU, not the baseline's
            while len(lat) < count:
                k = min(block, count - len(lat))
                await base(k, True)
                before = o.cpu()
                await ours(k, True)
                after = o.cpu()
                cpu1 = {key: used + after[key] - before[key] for key, used in cpu1.items()}
            st1 = await s.status()
    finally:
        fan.close()
    return {
        "st0": st0,
        "st1": st1,
        "cpu0": cpu0,
        "cpu1": cpu1,
        "p50_us": percentile(lat, 50),
        "p99_us": percentile(lat, 99),
        "n": len(lat),
        "base": {"p50_us": percentile(blat, 50), "p99_us": percentile(blat, 99), "n": len(blat)},
    }


async def drive_pipelined_interleaved(
    o: Ours,
    fan: baseline_fanout.Fanout,
    window: int,
    warmup_s: float,
    duration_s: float,
    rounds: int,
    relay: baseline_relay.RelayDriver | None = None,
) -> dict[str, Any]:
    """Benchmark 2 on both sides in one event loop: ``rounds`` blocks of
    ``duration_s / rounds`` each, a baseline block then (with ``relay``) the idealized
    pipeline's, then ours, each after a ramp-up that is not
    counted (``warmup_s`` in the first round, ``RAMP_S`` later), so a load change on the
    shared machine hits both sides alike (measuring the baseline's 3 s first and ours after
    it let other work in either half swing the ratio by 2x). Ours is counted by hmmd's
    Status ``invalidations`` delta across each block, the baseline by its completions
    inside the block."""
    from hmmirror.client import connect

    t = o.target
    pc = time.perf_counter
    block_s = duration_s / rounds
    res: dict[str, Any] = {"rounds": [], "relay_rounds": [], "ours_of_relay": []}
    errors: list[str] = []
    fan.start()
    if relay is not None:
        relay.start()
    try:
        async with connect(o.endpoint, name="bench-driver") as s:

            def sync_page(k: int) -> Awaitable[None]:
                a = t.addr + (k % TARGET_PAGES) * PAGE
                return s.sync_range(t.pid, a, a + PAGE)

            def base_op(k: int) -> Awaitable[int]:
                return fan.invalidate(1, (k % 256) * PAGE, (k % 256 + 1) * PAGE)

            def relay_op(k: int) -> Awaitable[None]:
                assert relay is not None
                return relay.invalidate((k % 256) * PAGE, (k % 256 + 1) * PAGE)

            base_lat: list[float] = []
            relay_done = 0
            our_lat: list[float] = []
            base_done = our_inv = our_done = 0
            our_dt = 0.0
            cpu = dict.fromkeys(o.cpu(), 0.0)
            first: dict[str, Any] = {}
            last: dict[str, Any] = {}
            for r in range(rounds):
                ramp = warmup_s if r == 0 else RAMP_S
                t_meas = pc() + ramp
                done, lat = await baseline_fanout.windowed(
                    base_op, window, t_meas, t_meas + block_s
                )
                base_done += done
                base_lat += lat
                brate = done / block_s
                rrate = 0.0
                if relay is not None:
                    t_meas = pc() + ramp
                    done, _ = await baseline_fanout.windowed(
                        relay_op, window, t_meas, t_meas + block_s
                    )
                    relay_done += done
                    rrate = done / block_s
                    res["relay_rounds"].append(rrate / brate if brate else float("nan"))
                t_meas = pc() + ramp
                t_end = t_meas + block_s
                mark: dict[str, Any] = {}

                async def sampler(
                    mark: dict[str, Any] = mark, t_meas: float = t_meas, t_end: float = t_end
                ) -> None:
                    await asyncio.sleep(max(0.0, t_meas - pc()))
                    mark["st0"], mark["ts0"], mark["cpu0"] = await s.status(), pc(), o.cpu()
                    await asyncio.sleep(max(0.0, t_end - pc()))
                    mark["st1"], mark["ts1"], mark["cpu1"] = await s.status(), pc(), o.cpu()

                _, (done, lat) = await asyncio.wait_for(
                    asyncio.gather(
                        sampler(),
                        baseline_fanout.windowed(sync_page, window, t_meas, t_end, errors),
                    ),
                    ramp + block_s + 30.0,
                )
                dinv = mark["st1"]["invalidations"] - mark["st0"]["invalidations"]
                dt = mark["ts1"] - mark["ts0"]
                our_inv += dinv
                our_dt += dt
                our_done += done
                our_lat += lat
                for k in cpu:
                    cpu[k] += mark["cpu1"][k] - mark["cpu0"][k]
                first = first or mark
                last = mark
                res["rounds"].append((dinv / dt) / brate if brate else float("nan"))
                if rrate:
                    res["ours_of_relay"].append((dinv / dt) / rrate)
    finally:
        fan.close()
        if relay is not None:
            relay.close()
    res.update(
        st0=first["st0"],
        st1=last["st1"],
        ts0=0.0,
        ts1=our_dt,
        cpu0={k: 0.0 for k in cpu},
        cpu1=cpu,
        our_invalidations=our_inv,
        base_rate=base_done / (rounds * block_s),
        relay_rate=relay_done / (rounds * block_s),
        base_lat_p50_ms=percentile(base_lat, 50),
        base_lat_p99_ms=percentile(base_lat, 99),
        driver_rate=our_done / (rounds * block_s),
        completed=our_done,
        lat_p50_ms=percentile(our_lat, 50),
        lat_p99_ms=percentile(our_lat, 99),
        errors=errors,
    )
    return res


def pinv(stats: list[dict[str, Any]]) -> list[Any]:
    """Each agent's page_invalidations counter (or its error)."""
    return [a.get("counters", {}).get("page_invalidations", a.get("error")) for a in stats]


def delta(st0: dict[str, Any], st1: dict[str, Any], key: str) -> Any:
    try:
        return st1[key] - st0[key]
    except Exception:
        return "?"
