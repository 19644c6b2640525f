"""Baseline: the raw pyzmq fan-out the daemon is measured against.

A re-implementation of the recommended ``uvraw-coal`` pattern (docs/ARCHITECTURE.md §B):

* ``Fanout`` owns one plain (not zmq.asyncio) ROUTER socket. Its FD is registered with
  ``loop.add_reader``; because the FD is edge-triggered the reader drains with NOBLOCK while
  ``EVENTS & POLLIN``, and every flush re-checks ``EVENTS`` afterwards.
* ``invalidate()`` queues the range; every call made in the same loop iteration leaves as one
  batch message per agent, flushed by ``loop.call_soon`` (no timer, so W=1 pays one loop turn).
* Agents (``agent_main``, separate processes, blocking DEALER) drain whatever is queued and answer
  with one cumulative ack carrying the highest sequence number they have seen. ROUTER/DEALER keeps
  per-peer FIFO order, so "ack S" covers every seq <= S.

``run_w1`` and ``run_pipelined`` drive it the same way the hmmirror half is driven
(``windowed``, the pipelined callers, serves both halves).
Run as a script, this file is the agent: ``python bench/baseline_fanout.py agent EP ID``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import msgpack
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HELPER_MAX_S, PY, Procs, percentile

HERE = os.path.dirname(os.path.abspath(__file__))
#: Upper bound on any one benchmark phase, seconds.
LIMIT_S = 300.0

T = TypeVar("T")


class Fanout:
    """Coalescing invalidation fan-out to a fixed set of agents, with cumulative acks."""

    def __init__(
        self,
        endpoint: str,
        agents: Sequence[bytes],
        *,
        ctx: zmq.Context | None = None,
        heartbeat_ms: int = 1000,
        timeout_s: float = 2.0,
    ) -> None:
        self.ctx = ctx or zmq.Context.instance()
        sock = self.sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.router_mandatory = 1
        sock.heartbeat_ivl = heartbeat_ms
        sock.heartbeat_timeout = 3 * heartbeat_ms
        sock.sndhwm = 100000
        sock.rcvhwm = 100000
        sock.bind(endpoint)
        self.fd = sock.getsockopt(zmq.FD)
        self.agents = list(agents)
        self.timeout_s = timeout_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.seq = 0
        self.waiting: dict[int, list[Any]] = {}  # seq -> [acks still missing, future]
        self.acked = {a: 0 for a in self.agents}  # agent -> highest cumulative ack
        self.queue: list[tuple[int, list[Any]]] = []
        self.flush_pending = False

    def wait_hellos(self, timeout: float) -> None:
        """Setup only (before start()): block until every agent said hello."""
        seen: set[bytes] = set()
        deadline = time.monotonic() + timeout
        while len(seen) < len(self.agents):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"only {len(seen)}/{len(self.agents)} baseline agents said hello"
                )
            if self.sock.poll(int(min(left, 0.2) * 1000)):
                ident, _payload = self.sock.recv_multipart()
                seen.add(ident)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.fd, self._on_readable)
        self.loop.call_soon(self._on_readable)  # the edge may already have been consumed

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.fd)
        self.sock.close(0)

    # receive side: drain until the socket reports no more input
    def _on_readable(self) -> None:
        sock = self.sock
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            parts = sock.recv_multipart(zmq.NOBLOCK)
            if len(parts) == 2 and parts[1] != b"hello":
                self._ack(parts[0], msgpack.unpackb(parts[1])["seq"])

    def _ack(self, agent: bytes, upto: int) -> None:
        before = self.acked.get(agent)
        if before is None or upto <= before:
            return
        self.acked[agent] = upto
        for s in range(before + 1, upto + 1):
            w = self.waiting.get(s)
            if w is None:
                continue
            w[0] -= 1
            if w[0] == 0:
                del self.waiting[s]
                if not w[1].done():
                    w[1].set_result(s)

    # send side: one batch per agent per loop iteration
    def _flush(self) -> None:
        self.flush_pending = False
        if not self.queue:
            return
        lo, hi = self.queue[0][0], self.queue[-1][0]
        msg = msgpack.packb(
            {
                "type": "invalidate_batch",
                "first": lo,
                "last": hi,
                "items": [it for _, it in self.queue],
            }
        )
        self.queue.clear()
        for agent in self.agents:
            try:
                self.sock.send_multipart([agent, msg], zmq.NOBLOCK)
            except zmq.Again:
                self._fail(lo, hi, agent, "at HWM")
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    raise
                self._fail(lo, hi, agent, "unreachable")
        if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # a send can swallow the read edge
            assert self.loop is not None
            self.loop.call_soon(self._on_readable)

    def _fail(self, lo: int, hi: int, agent: bytes, why: str) -> None:
        for s in range(lo, hi + 1):
            w = self.waiting.pop(s, None)
            if w is not None and not w[1].done():
                w[1].set_exception(ConnectionError(f"agent {agent!r} {why} (seq {s})"))

    def submit(self, mm: int, start: int, end: int, event: int = 0) -> asyncio.Future[int]:
        """Queue one invalidation; the future gets its seq once every agent acked it."""
        assert self.loop is not None
        self.seq += 1
        s = self.seq
        fut = self.loop.create_future()
        self.waiting[s] = [len(self.agents), fut]
        self.queue.append((s, [mm, start, end, event]))
        if not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self._flush)
        return fut

    async def invalidate(self, mm: int, start: int, end: int, event: int = 0) -> int:
        fut = self.submit(mm, start, end, event)
        s = self.seq
        try:
            return await asyncio.wait_for(fut, self.timeout_s)
        finally:
            self.waiting.pop(s, None)


# --------------------------------------------------------------------------- agent process


def drain(recv: Callable[[int], T]) -> Iterator[T]:
    """Every message queued on a socket now: ``recv(zmq.NOBLOCK)`` until ``zmq.Again``."""
    while True:
        try:
            yield recv(zmq.NOBLOCK)
        except zmq.Again:
            return


def agent_main(endpoint: str, name: str) -> int:
    """Blocking DEALER: drain everything queued, then one cumulative ack with the highest seq."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.routing_id = name.encode()
    sock.rcvhwm = 100000
    sock.sndhwm = 100000
    sock.connect(endpoint)
    sock.send(b"hello")
    unpackb, packb = msgpack.unpackb, msgpack.packb
    deadline = time.monotonic() + HELPER_MAX_S
    ppid = os.getppid()
    try:
        while time.monotonic() < deadline:
            if not sock.poll(500):
                if os.getppid() != ppid:
                    break
                continue
            last = 0
            for payload in drain(sock.recv):
                m = unpackb(payload)
                if m["last"] > last:
                    last = m["last"]
            if last:
                sock.send(packb({"type": "ack", "seq": last}))
    finally:
        sock.close(0)
        ctx.term()
    return 0


# --------------------------------------------------------------------------- drivers


def pick_runner(loop: str) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    if loop == "uvloop":
        import uvloop

        return uvloop.run  # type: ignore[no-any-return]
    return asyncio.run


def run_bounded(loop: str, coro: Coroutine[Any, Any, Any], limit: float) -> Any:
    """Run ``coro`` on a fresh event loop, cancelling it after ``limit`` seconds."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro, limit)

    return pick_runner(loop)(bounded())


async def windowed(
    op: Callable[[int], Awaitable[object]],
    window: int,
    t_meas: float,
    t_end: float,
    errors: list[str] | None = None,
) -> tuple[int, list[float]]:
    """``window`` concurrent callers: caller ``w`` awaits ``op(k)`` for k = w, w + window, ...
    until ``t_end`` (``time.perf_counter``). Returns how many calls completed inside
    [``t_meas``, ``t_end``] and their latencies in ms.

    A failed call propagates, unless ``errors`` is given: then the first five are recorded
    there and the call is retried after 1 ms, so that the load keeps going.
    """
    pc = time.perf_counter
    done = 0
    lat: list[float] = []

    async def caller(w: int) -> None:
        nonlocal done
        k = w
        while True:
            t0 = pc()
            if t0 >= t_end:
                return
            try:
                await op(k)
            except Exception as exc:
                if errors is None:
                    raise
                if len(errors) < 5:
                    errors.append(repr(exc)[:200])
                await asyncio.sleep(0.001)
                continue
            t1 = pc()
            k += window
            if t_meas <= t1 <= t_end:
                done += 1
                lat.append((t1 - t0) * 1e3)

    await asyncio.gather(*(caller(w) for w in range(window)))
    return done, lat


def setup(procs: Procs, endpoint: str, n: int, ctx: zmq.Context) -> Fanout:
    ids = [b"bagent-%d" % i for i in range(n)]
    fan = Fanout(endpoint, ids, ctx=ctx)
    for i in ids:
        procs.spawn([PY, os.path.join(HERE, "baseline_fanout.py"), "agent", endpoint, i.decode()])
    fan.wait_hellos(20.0)
    return fan


def run_w1(
    endpoint: str, n: int, count: int, warmup: int, loop: str = "uvloop"
) -> dict[str, float]:
    """Strictly one invalidation at a time; latency until all ``n`` acks, in microseconds."""
    ctx = zmq.Context()
    lat: list[float] = []

    async def main(fan: Fanout) -> None:
        fan.start()
        pc = time.perf_counter
        for i in range(warmup + count):
            t0 = pc()
            await fan.invalidate(1, (i % 256) * 4096, (i % 256 + 1) * 4096)
            dt = pc() - t0
            if i >= warmup:
                lat.append(dt * 1e6)

    try:
        with Procs() as procs:
            fan = setup(procs, endpoint, n, ctx)
            try:
                t0 = time.perf_counter()
                run_bounded(loop, main(fan), LIMIT_S)
                wall = time.perf_counter() - t0
            finally:
                fan.close()
    finally:
        ctx.destroy(linger=0)  # never hang on a socket left open
    return {
        "p50_us": percentile(lat, 50),
        "p99_us": percentile(lat, 99),
        "n": len(lat),
        "rate": (warmup + count) / wall,
    }


def run_pipelined(
    endpoint: str, n: int, window: int, warmup_s: float, duration_s: float, loop: str = "uvloop"
) -> dict[str, float]:
    """``window`` concurrent invalidate() callers; completions/s inside the measured window."""
    ctx = zmq.Context()
    res: dict[str, float] = {}

    async def main(fan: Fanout) -> None:
        fan.start()
        t_meas = time.perf_counter() + warmup_s
        t_end = t_meas + duration_s
        done, lat = await windowed(
            lambda k: fan.invalidate(1, (k % 256) * 4096, (k % 256 + 1) * 4096),
            window,
            t_meas,
            t_end,
        )
        res.update(
            rate=done / duration_s,
            completed=done,
            lat_p50_ms=percentile(lat, 50),
            lat_p99_ms=percentile(lat, 99),
        )

    try:
        with Procs() as procs:
            fan = setup(procs, endpoint, n, ctx)
            try:
                run_bounded(loop, main(fan), LIMIT_S)
            finally:
                fan.close()
    finally:
        ctx.destroy(linger=0)  # never hang on a socket left open
    return res


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "agent":
        sys.exit(agent_main(sys.argv[2], sys.argv[3]))
    # quick standalone check
    from common import tmpdir

    with tmpdir() as d:
        ep = f"ipc://{d}/base.sock"
        for n in (1, 8):
            print(f"W=1 N={n}:", run_w1(ep, n, 2000, 200))
        print("W=64 N=8:", run_pipelined(ep, 8, 64, 0.5, 3.0))
