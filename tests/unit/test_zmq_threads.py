"""libzmq's threads in every context hmmirror makes run under SCHED_BATCH (``sockets.context``).

A normal I/O thread woken by a send preempts the sender on its core for each message; a
SCHED_BATCH one does not (docs/ARCHITECTURE.md §B). The threads are
the ones that appear in this process while the context is made and used.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import zmq
from hmmirror.client.mlx5 import RdmaPeer
from hmmirror.transport import Server
from hmmirror.transport.sockets import context


def zmq_threads() -> dict[int, str]:
    """This process's libzmq threads (named ``ZMQbg/...``): tid -> name."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            name = f.read().strip()
        if name.startswith("ZMQbg/"):
            out[int(tid)] = name
    return out


def since(before: dict[int, str]) -> dict[str, int]:
    """The libzmq threads started since ``before`` was taken (and still running), each with
    its scheduling policy: "NAME (TID)" -> policy."""
    return {
        f"{name} ({tid})": os.sched_getscheduler(tid)
        for tid, name in zmq_threads().items()
        if tid not in before
    }


def test_a_context_runs_its_threads_under_sched_batch_at_the_callers_nice() -> None:
    before = zmq_threads()
    ctx = context()
    sock = ctx.socket(zmq.DEALER)  # libzmq starts its threads with the first socket
    try:
        sock.bind("inproc://hmmirror-test-threads")
        got = since(before)
        nices = {os.getpriority(os.PRIO_PROCESS, t) for t in zmq_threads() if t not in before}
    finally:
        sock.close(linger=0)
        ctx.term()
    assert got and set(got.values()) == {os.SCHED_BATCH}, got
    assert nices == {os.getpriority(os.PRIO_PROCESS, 0)}, nices
    # The caller's own thread is left as it was.
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


async def test_servers_and_clients_make_their_contexts_that_way() -> None:
    """A Server that makes its own context (hmmd's, hm-agent's) and a client's Channel: each
    context has the policy set for its threads."""
    directory = tempfile.mkdtemp(prefix="hmmthreads-", dir="/tmp")
    server = Server(f"ipc://{directory}/s.sock", lambda conn, frames: None)
    peer = RdmaPeer("tcp://127.0.0.1:9", 1.0)  # no dial: the constructor makes the context
    try:
        got = {
            "server": server.ctx.get(zmq.THREAD_SCHED_POLICY),
            "client": peer.ctx.get(zmq.THREAD_SCHED_POLICY),
        }
    finally:
        peer.close()
        server.close()
        shutil.rmtree(directory, ignore_errors=True)
    assert got == {"server": os.SCHED_BATCH, "client": os.SCHED_BATCH}, got
