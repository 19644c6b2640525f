"""Benchmarks 1 and 2: invalidation round trip (W=1) and pipelined invalidations/s (W=64).

Ours: a real ``hmmd`` + N agent processes (hmmirror.client, each mirroring the same range of a
small target process) + a driver session in this process that calls ``session.sync_range``.
Baseline: ``baseline_fanout.Fanout`` (raw ROUTER, add_reader drain, coalescing, cumulative acks)
with N raw blocking-DEALER agent processes, measured in the same run.

Run as a script with ``agent ...`` this file is one hmmirror agent process; with ``rawagent ...``
it is a diagnostic agent that speaks the hmmirror protocol on a blocking pyzmq DEALER (the same
kind of agent loop as the baseline's), to separate the daemon's cost from the client library's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baseline_fanout
from common import (
    HELPER_MAX_S,
    PAGE,
    PY,
    Procs,
    Row,
    percentile,
    read_line,
    settle,
    spawn_target,
    start_daemon,
    tmpdir,
    verdict,
)

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_PAGES = 256  # the mirrored range: 1 MiB, populated


# --------------------------------------------------------------------------- agent process


async def _agent(endpoint: str, name: str, pid: int, start: int, length: int) -> None:
    from hmmirror.client import Access, connect

    async with connect(endpoint, name=name) as session:
        mirror = await session.mirror(pid, start, length, Access.READ | Access.WRITE)
        got = await mirror.fault(start, mirror.npages)
        print(f"agent ready {name} mirror={mirror.id} faulted={got}", flush=True)
        loop = asyncio.get_running_loop()
        closed = asyncio.Event()

        def on_stdin() -> None:
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(0)
                closed.set()

        loop.add_reader(0, on_stdin)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closed.wait(), HELPER_MAX_S)
        stats = {
            "counters": dict(mirror.counters),
            "retries": mirror.retries,
            "released": mirror.released,
        }
        print("agent stats " + json.dumps(stats), flush=True)
        await mirror.close()


def agent_main(argv: list[str]) -> int:
    endpoint, name, pid, start, length = (
        argv[0],
        argv[1],
        int(argv[2]),
        int(argv[3], 0),
        int(argv[4]),
    )
    baseline_fanout.pick_runner("uvloop")(_agent(endpoint, name, pid, start, length))
    return 0


def rawagent_main(argv: list[str]) -> int:
    """Blocking DEALER speaking the hmmirror protocol: hello, register, drain + cumulative ack."""
    import zmq
    from hmmirror.proto import decode, encode
    from hmmirror.proto.messages import Ack, Goodbye, Heartbeat, Hello, Register
    from hmmirror.transport import dial

    endpoint, name, pid, start, length = (
        argv[0],
        argv[1],
        int(argv[2]),
        int(argv[3], 0),
        int(argv[4]),
    )
    ctx = zmq.Context()
    sock = dial(ctx, endpoint)
    ids = iter(range(1, 1 << 62))

    def call(msg: Any) -> Any:
        sock.send_multipart(encode(msg, next(ids)))
        if not sock.poll(10000):
            raise TimeoutError(f"no reply to {msg.TYPE}")
        env = decode(sock.recv_multipart())
        if env.type == "error":
            raise RuntimeError(f"{msg.TYPE}: {env.msg}")
        return env.msg

    try:
        welcome = call(Hello(agent=name, pid=os.getpid()))
        reg = call(Register(pid=pid, start_time=0, intervals=((start, start + length),), access=3))
        print(f"agent ready {name} mirror={reg.mirror} (raw protocol)", flush=True)
        beat = max(0.05, welcome.heartbeat_ms / 2000.0)
        next_beat = time.monotonic() + beat
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(0, zmq.POLLIN)
        deadline = time.monotonic() + HELPER_MAX_S
        acked = invalidates = 0
        while time.monotonic() < deadline:
            ready = dict(poller.poll(int(beat * 1000)))
            if 0 in ready and not os.read(0, 4096):
                break
            upto = acked
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                env = decode(frames)
                if env.type == "invalidate":
                    invalidates += 1
                    upto = max(upto, env.msg.n)
            if upto > acked:
                acked = upto
                sock.send_multipart(encode(Ack(n=upto), next(ids)))
            now = time.monotonic()
            if now >= next_beat:
                sock.send_multipart(encode(Heartbeat(), next(ids)))
                next_beat = now + beat
        print(
            "agent stats " + json.dumps({"counters": {"page_invalidations": invalidates}}),
            flush=True,
        )
        sock.send_multipart(encode(Goodbye(), next(ids)))
        sock.poll(2000)  # the daemon's ok (best effort)
    finally:
        sock.close(0)
        ctx.term()
    return 0


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
                            os.path.join(HERE, "bench_invalidate.py"),
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

    def __exit__(self, *exc: Any) -> None:
        try:
            self.procs.__exit__(*exc)
            bad = self.daemon.problems() if hasattr(self, "daemon") else ""
            if bad:
                print(f"[hmmd log] {bad}", flush=True)
        finally:
            self._tmp.__exit__(*exc)


async def _drive_w1(
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
            while len(lat) < count:
                k = min(block, count - len(lat))
                await base(k, True)
                await ours(k, True)
            st1 = await s.status()
    finally:
        fan.close()
    return {
        "st0": st0,
        "st1": st1,
        "p50_us": percentile(lat, 50),
        "p99_us": percentile(lat, 99),
        "n": len(lat),
        "base": {"p50_us": percentile(blat, 50), "p99_us": percentile(blat, 99), "n": len(blat)},
    }


async def _drive_pipelined(
    o: Ours, window: int, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    from hmmirror.client import connect

    t = o.target
    res: dict[str, Any] = {}
    async with connect(o.endpoint, name="bench-driver") as s:
        pc = time.perf_counter
        t_begin = pc()
        t_meas = t_begin + warmup_s
        t_end = t_meas + duration_s
        done = 0
        errors: list[str] = []
        lat: list[float] = []

        async def worker(w: int) -> None:
            nonlocal done
            k = w
            while True:
                t0 = pc()
                if t0 >= t_end:
                    return
                a = t.addr + (k % TARGET_PAGES) * PAGE
                try:
                    await s.sync_range(t.pid, a, a + PAGE)
                except Exception as exc:  # record, keep the load going
                    if len(errors) < 5:
                        errors.append(repr(exc)[:200])
                    await asyncio.sleep(0.001)
                    continue
                t1 = pc()
                k += window
                if t_meas <= t1 <= t_end:
                    done += 1
                    lat.append((t1 - t0) * 1e3)

        async def sampler() -> None:
            await asyncio.sleep(max(0.0, t_meas - pc()))
            res["st0"], res["ts0"] = await s.status(), pc()
            await asyncio.sleep(max(0.0, t_end - pc()))
            res["st1"], res["ts1"] = await s.status(), pc()

        await asyncio.wait_for(
            asyncio.gather(sampler(), *(worker(w) for w in range(window))),
            warmup_s + duration_s + 30.0,
        )
        res.update(
            driver_rate=done / duration_s,
            completed=done,
            lat_p50_ms=percentile(lat, 50),
            lat_p99_ms=percentile(lat, 99),
            errors=errors,
        )
    return res


def _pinv(stats: list[dict[str, Any]]) -> list[Any]:
    """Each agent's page_invalidations counter (or its error)."""
    return [a.get("counters", {}).get("page_invalidations", a.get("error")) for a in stats]


def _delta(st0: dict[str, Any], st1: dict[str, Any], key: str) -> Any:
    try:
        return st1[key] - st0[key]
    except Exception:
        return "?"


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
                    loop, _drive_w1(o, fan, count, warmup, block), baseline_fanout.LIMIT_S
                )
                r["agents"] = o.agent_stats()
    finally:
        ctx.destroy(linger=0)
    st0, st1 = r["st0"], r["st1"]
    r["d50"], r["d99"] = float(st1["ack_p50_us"]), float(st1["ack_p99_us"])
    r["note"] = (
        f"daemon invalidations +{_delta(st0, st1, 'invalidations')}, "
        f"evictions +{_delta(st0, st1, 'evictions')}, "
        f"bad_messages +{_delta(st0, st1, 'bad_messages')}; "
        f"agent page_invalidations {_pinv(r['agents'])}"
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
    log: Any,
) -> dict[str, Any]:
    with Ours(n, daemon_args, kind) as o:
        settle(log)
        r = baseline_fanout.run_bounded(
            loop, _drive_pipelined(o, window, warmup_s, duration_s), baseline_fanout.LIMIT_S
        )
        r["agents"] = o.agent_stats()
    st0, st1 = r["st0"], r["st1"]
    dt = r["ts1"] - r["ts0"]
    dinv = st1["invalidations"] - st0["invalidations"]
    r["rate"] = dinv / dt
    r["note"] = (
        f"driver-observed {r['driver_rate']:.0f} sync_range/s (latency p50 {r['lat_p50_ms']:.2f} "
        f"ms, p99 {r['lat_p99_ms']:.2f} ms); daemon invalidations +{dinv} in {dt:.2f} s, "
        f"inbound messages +{_delta(st0, st1, 'messages')} (sync_range+ack+heartbeat+status), "
        f"evictions +{_delta(st0, st1, 'evictions')}, ack p50/p99 {st1.get('ack_p50_us')}/"
        f"{st1.get('ack_p99_us')} us; agent page_invalidations {_pinv(r['agents'])}"
        + (f"; errors {r['errors']}" if r["errors"] else "")
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
) -> list[Row]:
    settle(log)
    with tmpdir() as d:
        base = baseline_fanout.run_pipelined(
            f"ipc://{d}/base.sock", n, window, warmup_s, duration_s, loop
        )
    brate = base["rate"]
    log(
        f"[pipelined N={n} W={window}] baseline raw coalesced fan-out: {brate:.0f} inval/s "
        f"(latency p50 {base['lat_p50_ms']:.2f} ms, p99 {base['lat_p99_ms']:.2f} ms)"
    )
    name = f"pipelined N={n} W={window} inval/s"
    try:
        r = _pipe_ours(n, window, warmup_s, duration_s, loop, daemon_args, "agent", log)
    except Exception as exc:
        log(f"[{name}] hmmirror side failed: {exc!r}")
        return [Row(name, "ERROR", f"{brate:.0f}/s", None, ">= 0.7", "ERROR", repr(exc)[:300])]
    log(f"[{name}] hmmd: {r['rate']:.0f} inval/s (Status 'invalidations' delta); {r['note']}")
    ratio = r["rate"] / brate
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
    if diag:
        try:
            q = _pipe_ours(n, window, warmup_s, duration_s, loop, daemon_args, "rawagent", log)
            log(
                f"[{name}] DIAG hmmd + raw-protocol blocking agents: {q['rate']:.0f} inval/s; "
                f"{q['note']}"
            )
            rows.append(
                Row(
                    name + " (hmmd counter, DIAG raw agents)",
                    f"{q['rate']:.0f}/s",
                    f"{brate:.0f}/s",
                    q["rate"] / brate,
                    "info",
                    "-",
                )
            )
        except Exception as exc:
            log(f"[{name}] DIAG raw agents failed: {exc!r}")
    return rows


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "agent":
        sys.exit(agent_main(sys.argv[2:]))
    if len(sys.argv) >= 2 and sys.argv[1] == "rawagent":
        sys.exit(rawagent_main(sys.argv[2:]))
    print("usage: python -m bench --only invalidate|pipelined", file=sys.stderr)
    sys.exit(2)
