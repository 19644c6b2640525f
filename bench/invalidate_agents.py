"""The agent processes of benchmarks 1 and 2 (``bench_invalidate``), one per process.

``python bench/invalidate_agents.py agent ENDPOINT NAME PID START LENGTH`` is one hmmirror
agent (hmmirror.client: mirror the range, fault it all in, say ``agent ready``, hold it until
stdin closes, then print ``agent stats {json}``). With ``rawagent`` it is a diagnostic agent
that speaks the hmmirror protocol on a blocking pyzmq DEALER (the same kind of agent loop as the
baseline's), to separate the daemon's cost from the client library's.
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
from common import HELPER_MAX_S, StdinLines, agent_args, run_modes

# --------------------------------------------------------------------------- agent process


async def _agent(endpoint: str, name: str, pid: int, start: int, length: int) -> None:
    from hmmirror.client import Access, connect

    async with connect(endpoint, name=name) as session:
        mirror = await session.mirror(pid, start, length, Access.READ | Access.WRITE)
        got = await mirror.fault(start, mirror.npages)
        print(f"agent ready {name} mirror={mirror.id} faulted={got}", flush=True)
        stdin = StdinLines(asyncio.get_running_loop())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stdin.closed.wait(), HELPER_MAX_S)
        stats = {
            "counters": dict(mirror.counters),
            "retries": mirror.retries,
            "released": mirror.released,
        }
        print("agent stats " + json.dumps(stats), flush=True)
        await mirror.close()


def agent_main(argv: list[str]) -> int:
    """``agent ENDPOINT NAME PID START LENGTH``."""
    baseline_fanout.pick_runner("uvloop")(_agent(*agent_args(argv)))
    return 0


def rawagent_main(argv: list[str]) -> int:
    """Blocking DEALER speaking the hmmirror protocol: hello, register, drain + cumulative ack."""
    import zmq
    from hmmirror.proto import decode, encode
    from hmmirror.proto.messages import Ack, Goodbye, Heartbeat, Hello, Register
    from hmmirror.transport import dial

    endpoint, name, pid, start, length = agent_args(argv)
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
            for frames in baseline_fanout.drain(sock.recv_multipart):
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


if __name__ == "__main__":
    run_modes(
        {"agent": agent_main, "rawagent": rawagent_main},
        "python -m bench --only invalidate|pipelined",
    )
