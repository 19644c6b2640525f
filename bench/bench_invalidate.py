"""Benchmarks 1 and 2: invalidation round trip (W=1) and pipelined invalidations/s (W=64).

Ours: a real ``hmmd`` + N agent processes (hmmirror.client, each mirroring the same range of a
small target process) + a driver session in this process that calls ``session.sync_range``.
Baseline: ``baseline_fanout.Fanout`` (raw ROUTER, add_reader drain, coalescing, cumulative acks)
with N raw blocking-DEALER agent processes, measured in the same run.

The agent processes are ``invalidate_agents.py``; hmmd, the target, the agents and the drivers
that measure them are ``invalidate_rig.py``.
"""

from __future__ import annotations

import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baseline_fanout
import baseline_relay
from common import (
    Procs,
    Row,
    settle,
    tmpdir,
    verdict,
)
from invalidate_rig import (
    Ours,
    cpu_per_invalidation,
    delta,
    drive_pipelined_interleaved,
    drive_w1,
    pinv,
)

# --------------------------------------------------------------------------- benchmarks


def _w1_ours(
    n: int,
    count: int,
    warmup: int,
    loop: str,
    daemon_args: list[str],
    kind: str,
    block: int,
    log: Any,
) -> dict[str, Any]:
    import zmq

    ctx = zmq.Context()
    try:
        with tmpdir() as d, Procs() as bprocs:
            fan = baseline_fanout.setup(bprocs, f"ipc://{d}/base.sock", n, ctx)
            with Ours(n, daemon_args, kind) as o:
                settle(log)
                r = baseline_fanout.run_bounded(
                    loop, drive_w1(o, fan, count, warmup, block), baseline_fanout.LIMIT_S
                )
                r["agents"] = o.agent_stats()
    finally:
        ctx.destroy(linger=0)
    st0, st1 = r["st0"], r["st1"]
    r["d50"], r["d99"] = float(st1["ack_p50_us"]), float(st1["ack_p99_us"])
    r["note"] = (
        f"daemon invalidations +{delta(st0, st1, 'invalidations')}, "
        f"evictions +{delta(st0, st1, 'evictions')}, "
        f"bad_messages +{delta(st0, st1, 'bad_messages')}; "
        f"agent page_invalidations {pinv(r['agents'])}; {cpu_per_invalidation(r, r['n'])}"
    )
    return r


def bench_w1(
    agents: list[int],
    count: int,
    warmup: int,
    loop: str,
    daemon_args: list[str],
    diag: bool = False,
    block: int = 250,
    log: Any = print,
) -> list[Row]:
    rows: list[Row] = []
    for n in agents:
        head = f"inval W=1 N={n}"
        try:
            r = _w1_ours(n, count, warmup, loop, daemon_args, "agent", block, log)
        except Exception as exc:
            log(f"[invalidate N={n}] hmmirror side failed: {exc!r}; baseline alone:")
            settle(log)
            with tmpdir() as d:
                base = baseline_fanout.run_w1(f"ipc://{d}/base.sock", n, count, warmup, loop)
            log(
                f"[invalidate N={n}] baseline raw fan-out: p50 {base['p50_us']:.0f} us, "
                f"p99 {base['p99_us']:.0f} us ({base['n']} samples)"
            )
            rows.append(
                Row(
                    f"{head} p50 (hmmd ack)",
                    "ERROR",
                    f"{base['p50_us']:.0f} us",
                    None,
                    "<= 1.3",
                    "ERROR",
                    repr(exc)[:300],
                )
            )
            continue
        b50, b99 = r["base"]["p50_us"], r["base"]["p99_us"]
        log(
            f"[invalidate N={n}] baseline raw fan-out (interleaved in blocks of {block}): "
            f"p50 {b50:.0f} us, p99 {b99:.0f} us ({r['base']['n']} samples)"
        )
        log(
            f"[invalidate N={n}] hmmd ack (daemon stats): p50 {r['d50']:.0f} us, "
            f"p99 {r['d99']:.0f} us; driver sync_range RTT p50 {r['p50_us']:.0f} us, "
            f"p99 {r['p99_us']:.0f} us; {r['note']}"
        )
        ratio = r["d50"] / b50
        rows += [
            Row(
                f"{head} p50 (hmmd ack)",
                f"{r['d50']:.0f} us",
                f"{b50:.0f} us",
                ratio,
                "<= 1.3",
                verdict(ratio, "<=", 1.3),
                r["note"],
            ),
            Row(
                f"{head} p99 (hmmd ack)",
                f"{r['d99']:.0f} us",
                f"{b99:.0f} us",
                r["d99"] / b99,
                "info",
                "-",
            ),
            Row(
                f"{head} p50 (driver sync_range RTT)",
                f"{r['p50_us']:.0f} us",
                f"{b50:.0f} us",
                r["p50_us"] / b50,
                "info",
                "-",
            ),
            Row(
                f"{head} p99 (driver sync_range RTT)",
                f"{r['p99_us']:.0f} us",
                f"{b99:.0f} us",
                r["p99_us"] / b99,
                "info",
                "-",
            ),
        ]
        if diag:
            try:
                q = _w1_ours(n, count, warmup, loop, daemon_args, "rawagent", block, log)
                q50 = q["base"]["p50_us"]
                log(
                    f"[invalidate N={n}] DIAG hmmd + raw-protocol blocking agents: hmmd ack p50 "
                    f"{q['d50']:.0f} us, p99 {q['d99']:.0f} us; driver RTT p50 "
                    f"{q['p50_us']:.0f} us; interleaved baseline p50 {q50:.0f} us; {q['note']}"
                )
                rows += [
                    Row(
                        f"{head} p50 (hmmd ack, DIAG raw agents)",
                        f"{q['d50']:.0f} us",
                        f"{q50:.0f} us",
                        q["d50"] / q50,
                        "info",
                        "-",
                    ),
                    Row(
                        f"{head} p50 (driver RTT, DIAG raw agents)",
                        f"{q['p50_us']:.0f} us",
                        f"{q50:.0f} us",
                        q["p50_us"] / q50,
                        "info",
                        "-",
                    ),
                ]
            except Exception as exc:
                log(f"[invalidate N={n}] DIAG raw agents failed: {exc!r}")
    return rows


def _pipe_ours(
    n: int,
    window: int,
    warmup_s: float,
    duration_s: float,
    loop: str,
    daemon_args: list[str],
    kind: str,
    rounds: int,
    log: Any,
) -> dict[str, Any]:
    import zmq

    ctx = zmq.Context()
    try:
        with tmpdir() as d, Procs() as bprocs:
            fan = baseline_fanout.setup(bprocs, f"ipc://{d}/base.sock", n, ctx)
            # The idealized pipeline (the raw fan-out behind a driver hop) with hmmd's own
            # agents only: the DIAG run compares agents, not topologies.
            relay = baseline_relay.setup_relay(bprocs, d, n, ctx) if kind == "agent" else None
            with Ours(n, daemon_args, kind) as o:
                settle(log)
                r = baseline_fanout.run_bounded(
                    loop,
                    drive_pipelined_interleaved(
                        o, fan, window, warmup_s, duration_s, rounds, relay
                    ),
                    baseline_fanout.LIMIT_S,
                )
                r["agents"] = o.agent_stats()
    finally:
        ctx.destroy(linger=0)
    st0, st1 = r["st0"], r["st1"]
    dinv, dt = r["our_invalidations"], r["ts1"] - r["ts0"]
    r["rate"] = dinv / dt
    ratios = sorted(r["rounds"])
    r["ratio"] = statistics.median(ratios)
    r["note"] = (
        f"median of {len(ratios)} interleaved rounds' ratios (range {ratios[0]:.2f}-"
        f"{ratios[-1]:.2f}); all rounds: hmmd {r['rate']:.0f}/s, baseline "
        f"{r['base_rate']:.0f}/s (latency p50 {r['base_lat_p50_ms']:.2f} ms, p99 "
        f"{r['base_lat_p99_ms']:.2f} ms); driver-observed {r['driver_rate']:.0f} sync_range/s "
        f"(latency p50 {r['lat_p50_ms']:.2f} ms, p99 {r['lat_p99_ms']:.2f} ms); daemon "
        f"invalidations +{dinv} in {dt:.2f} s of our blocks, evictions "
        f"+{delta(st0, st1, 'evictions')}, ack p50/p99 {st1.get('ack_p50_us')}/"
        f"{st1.get('ack_p99_us')} us; agent page_invalidations {pinv(r['agents'])}; "
        f"{cpu_per_invalidation(r, dinv)}" + (f"; errors {r['errors']}" if r["errors"] else "")
    )
    if r["relay_rounds"]:
        r["relay_ratio"] = statistics.median(r["relay_rounds"])
        r["ours_of_relay_ratio"] = statistics.median(r["ours_of_relay"])
        r["relay_note"] = (
            f"the raw fan-out in its own process, driven over ipc with each tick's calls "
            f"as one request (bench/baseline_relay.py), interleaved: {r['relay_rate']:.0f}/s; "
            f"median of the rounds' ratios to the baseline {r['relay_ratio']:.2f} (range "
            f"{min(r['relay_rounds']):.2f}-{max(r['relay_rounds']):.2f}); ours / ideal "
            f"{r['ours_of_relay_ratio']:.2f} (range {min(r['ours_of_relay']):.2f}-"
            f"{max(r['ours_of_relay']):.2f})"
        )
    return r


def bench_pipelined(
    n: int,
    window: int,
    warmup_s: float,
    duration_s: float,
    loop: str,
    daemon_args: list[str],
    diag: bool = False,
    log: Any = print,
    rounds: int = 6,
) -> list[Row]:
    name = f"pipelined N={n} W={window} inval/s"
    try:
        r = _pipe_ours(n, window, warmup_s, duration_s, loop, daemon_args, "agent", rounds, log)
    except Exception as exc:
        log(f"[{name}] failed: {exc!r}")
        return [Row(name, "ERROR", "-", None, ">= 0.7", "ERROR", repr(exc)[:300])]
    brate = r["base_rate"]
    log(
        f"[pipelined N={n} W={window}] baseline raw coalesced fan-out (interleaved in "
        f"{rounds} rounds): {brate:.0f} inval/s (latency p50 {r['base_lat_p50_ms']:.2f} ms, "
        f"p99 {r['base_lat_p99_ms']:.2f} ms)"
    )
    log(f"[{name}] hmmd: {r['rate']:.0f} inval/s (Status 'invalidations' delta); {r['note']}")
    ratio = r["ratio"]
    rows = [
        Row(
            name + " (hmmd counter)",
            f"{r['rate']:.0f}/s",
            f"{brate:.0f}/s",
            ratio,
            ">= 0.7",
            verdict(ratio, ">=", 0.7),
            r["note"],
        ),
        Row(
            name + " (driver-observed)",
            f"{r['driver_rate']:.0f}/s",
            f"{brate:.0f}/s",
            r["driver_rate"] / brate,
            "info",
            "-",
        ),
    ]
    if "relay_ratio" in r:
        log(f"[{name}] idealized pipeline with a driver hop: {r['relay_note']}")
        rows.append(
            Row(
                name + " (ideal: raw fan-out behind a driver hop)",
                f"{r['relay_rate']:.0f}/s",
                f"{brate:.0f}/s",
                r["relay_ratio"],
                "info",
                "-",
                r["relay_note"],
            )
        )
    if diag:
        try:
            q = _pipe_ours(
                n, window, warmup_s, duration_s, loop, daemon_args, "rawagent", rounds, log
            )
            log(
                f"[{name}] DIAG hmmd + raw-protocol blocking agents: {q['rate']:.0f} inval/s; "
                f"{q['note']}"
            )
            rows.append(
                Row(
                    name + " (hmmd counter, DIAG raw agents)",
                    f"{q['rate']:.0f}/s",
                    f"{q['base_rate']:.0f}/s",
                    q["ratio"],
                    "info",
                    "-",
                )
            )
        except Exception as exc:
            log(f"[{name}] DIAG raw agents failed: {exc!r}")
    return rows
