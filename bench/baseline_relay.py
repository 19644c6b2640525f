"""The idealized pipeline of benchmark 2: the raw fan-out behind a driver hop, as hmmd is.

Benchmark 2 drives hmmd from a client in the bench process (``sync_range``), so every
invalidation crosses one more process boundary each way than the baseline's ``Fanout``, which
the bench drives in process. This is that topology with nothing else in the way:

    bench (``RelayDriver``) --ipc--> relay process (``Fanout``) --ipc--> N raw agents

* ``RelayDriver`` (bench process): a DEALER on ``loop.add_reader``; the calls made in one loop
  tick leave as one request ``[id, [start, end, ...]]``, as the client library coalesces
  ``sync_range`` calls; each call's future completes when the request's answer comes.
* The relay (``python bench/baseline_relay.py relay FRONT BACK N``): a ROUTER drained the same
  way, a ``Fanout`` to N baseline agents (``baseline_fanout.py agent``), and one answer per
  request once every agent acked each of its ranges (callbacks, no tasks).

Plain pyzmq and msgpack only: no validation, no tables, no security, no deadlines beyond the
helpers' lifetime. "ideal / baseline" is the most any implementation of this topology gets on
the machine; "ours / ideal" is how much of it hmmd gets.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any, cast

import msgpack
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baseline_fanout import Fanout, run_bounded
from common import HELPER_MAX_S, PY, Procs, read_line

HERE = os.path.dirname(os.path.abspath(__file__))


def _socket(ctx: zmq.Context[Any], kind: int) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(kind)
    sock.linger = 0
    sock.sndhwm = 100000
    sock.rcvhwm = 100000
    return sock


def _pollin(sock: zmq.Socket[Any]) -> bool:
    """Whether ``sock`` has input (reading ``EVENTS`` also re-arms its edge-triggered FD)."""
    return bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


def _fd(sock: zmq.Socket[Any]) -> int:
    return cast(int, sock.getsockopt(zmq.FD))


# --------------------------------------------------------------------------- relay process


async def _serve(front: zmq.Socket[Any], fan: Fanout) -> None:
    """Answer each request once every one of its ranges is acked by every agent."""
    loop = asyncio.get_running_loop()
    fan.start()

    def answer(driver: bytes, req: bytes) -> None:
        front.send_multipart([driver, req], zmq.NOBLOCK)
        if _pollin(front):  # a send can swallow the read edge
            loop.call_soon(readable)

    def request(driver: bytes, payload: bytes) -> None:
        req, bounds = msgpack.unpackb(payload)
        left = [len(bounds) // 2]
        packed = msgpack.packb(req)

        def one_done(_fut: asyncio.Future[int]) -> None:
            left[0] -= 1
            if left[0] == 0:
                answer(driver, packed)

        for i in range(0, len(bounds), 2):
            fan.submit(1, bounds[i], bounds[i + 1]).add_done_callback(one_done)

    def readable() -> None:
        while _pollin(front):
            driver, payload = front.recv_multipart(zmq.NOBLOCK)
            request(driver, payload)

    fd = _fd(front)
    loop.add_reader(fd, readable)
    loop.call_soon(readable)
    try:
        await asyncio.sleep(HELPER_MAX_S)
    finally:
        loop.remove_reader(fd)
        fan.close()


def relay_main(front_ep: str, back_ep: str, n: int) -> int:
    """The relay process: wait for N agents' hellos, say ``relay ready``, serve."""
    ctx: zmq.Context[Any] = zmq.Context()
    front = _socket(ctx, zmq.ROUTER)
    try:
        fan = Fanout(back_ep, [b"ragent-%d" % i for i in range(n)], ctx=ctx)
        fan.wait_hellos(30.0)
        front.bind(front_ep)
        print("relay ready", flush=True)
        run_bounded("uvloop", _serve(front, fan), HELPER_MAX_S)
    except TimeoutError:  # the helper lifetime ran out
        pass
    finally:
        front.close(0)
        ctx.destroy(linger=0)
    return 0


# --------------------------------------------------------------------------- bench side


class RelayDriver:
    """The bench's end of the relay: calls made in one loop tick leave as one request."""

    def __init__(self, endpoint: str, ctx: zmq.Context[Any]) -> None:
        self.sock = _socket(ctx, zmq.DEALER)
        self.sock.connect(endpoint)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.next_req = 0
        self.bounds: list[int] = []
        self.futures: list[asyncio.Future[None]] = []
        self.waiting: dict[int, list[asyncio.Future[None]]] = {}

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.fd = _fd(self.sock)
        self.loop.add_reader(self.fd, self._readable)
        self.loop.call_soon(self._readable)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.fd)
        self.sock.close(0)

    def invalidate(self, start: int, end: int) -> asyncio.Future[None]:
        """One range; the future completes when the relay answers its request."""
        assert self.loop is not None
        fut = self.loop.create_future()
        if not self.futures:
            self.loop.call_soon(self._flush)
        self.bounds += (start, end)
        self.futures.append(fut)
        return fut

    def _flush(self) -> None:
        self.next_req += 1
        self.waiting[self.next_req] = self.futures
        self.sock.send(msgpack.packb([self.next_req, self.bounds]), zmq.NOBLOCK)
        self.bounds, self.futures = [], []
        if _pollin(self.sock):
            assert self.loop is not None
            self.loop.call_soon(self._readable)

    def _readable(self) -> None:
        while _pollin(self.sock):
            req = msgpack.unpackb(self.sock.recv(zmq.NOBLOCK))
            for fut in self.waiting.pop(req, ()):
                if not fut.done():
                    fut.set_result(None)


def setup_relay(procs: Procs, d: str, n: int, ctx: zmq.Context[Any]) -> RelayDriver:
    """Start the relay and its N agents under ``procs`` (sockets in ``d``); its driver."""
    front, back = f"ipc://{d}/relay-front.sock", f"ipc://{d}/relay-back.sock"
    relay = procs.spawn([PY, os.path.join(HERE, "baseline_relay.py"), "relay", front, back, str(n)])
    for i in range(n):
        procs.spawn([PY, os.path.join(HERE, "baseline_fanout.py"), "agent", back, f"ragent-{i}"])
    read_line(relay, "relay ready", 40.0)
    return RelayDriver(front, ctx)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "relay":
        sys.exit(relay_main(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    sys.exit("usage: baseline_relay.py relay FRONT_ENDPOINT BACK_ENDPOINT N")
