"""The ceiling of hmmirror's RDMA READ and WRITE paths: the same topology with nothing in the way.

An *idealized pipeline* built from plain blocking pyzmq loops, with no library,
no asyncio, no faults and no error handling, but the same hops and copies the
design requires:

    requester --tcp--> agent --ipc--> daemon: pagemap check, process_vm_readv
                                      into memory shared with the agent, recheck
    requester <--tcp-- agent (sends the shared slice; zero-copy from 64 KiB)

The agent drains every request waiting on its socket and checks each one
against an MTT (a numpy u64 array), then sends the whole batch to the daemon
as one message. The daemon reads the live pagemap before and after one
vectored process_vm_readv, for the batch, into the agent's memfd. That is one
copy more than the raw pyzmq transfer (the read out of the target) and one
ipc round trip more. Both are inherent to "the DMA is performed by hmmd".

A second variant (``ipc``) sends the data back over the daemon's socket, as
hmmirror's plain ``dma_read`` does, and the agent forwards the frames it received:
two more copies (into and out of the ipc socket) than the shared window.

A third (``thread``) is ``ipc`` with the daemon's copy on a worker thread, as hmmd
must run it: a ``process_vm_readv`` waits in the target's page fault for as long as
the fault takes, forever when the target's own userfaultfd never answers, so a copy
made on the daemon's loop would let any target stop it (docs/ARCHITECTURE.md §A.2,
``daemon/dma/copier.py``). The loop hands each batch to the thread and goes on; the
thread wakes it through an eventfd when the copy is done. That is two thread
wake-ups per batch more than ``ipc``: the ceiling of any hmmd that keeps that rule.

A WRITE takes the same hops the other way. With ``shm`` the agent copies the
request's data into its window (libzmq owns the frame it arrived in, and hmmd can
only write from its own memory) and the daemon checks the pagemap, then does one
vectored process_vm_writev for the batch from the window (a write is checked
once, before, as hmmd checks ``dma_write``). With ``ipc`` the agent forwards the
data frames to the daemon, which writes from them.

``bench_rdma`` measures both in the same rounds as the raw transfer and as
hmmirror. "ideal / raw" is the most any implementation of this design could
reach on this machine; "ours / ideal" is how much of it hmmirror gets.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Any

import msgpack
import numpy as np
import zmq

PAGE = 4096
VALID = np.uint64(1 << 63)
PFN = np.uint64((1 << 55) - 1)
#: One slot per request in flight; a 2 MiB READ fits one slot.
SLOT = 4 << 20
SLOTS = 16
LIFETIME = 600.0
_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.restype = ctypes.c_ssize_t


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _address(buf: Any) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def _tune(sock: zmq.Socket[Any]) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDBUF, 4 << 20)
    sock.setsockopt(zmq.RCVBUF, 4 << 20)


def _orphaned() -> bool:
    return os.getppid() == 1


def _live_ok(pagemap: int, batch: list[list[int]], named: Any) -> bool:
    """Whether the live pagemap still shows the pages the batch's entries name."""
    for addr, length, _, first, _ in batch:
        n = length // PAGE
        raw = os.pread(pagemap, n * 8, addr // PAGE * 8)
        live = np.frombuffer(raw, dtype=np.uint64) & PFN
        if not (live == (named[first : first + n] & PFN)).all():
            return False
    return True


def _vm_batch(pid: int, batch: list[list[int]], base: int, frames: list[Any]) -> bool:
    """One vectored process_vm_readv (or _writev, for a batch of writes) between the target
    and the window at ``base`` (or, for writes over ipc, the data ``frames``)."""
    n = len(batch)
    write = bool(batch[0][4])
    if frames:
        local = (_Iovec * n)(*[_Iovec(_address(f.buffer), len(f.buffer)) for f in frames])
    else:
        local = (_Iovec * n)(*[_Iovec(base + off, ln) for _, ln, off, _, _ in batch])
    remote = (_Iovec * n)(*[_Iovec(a, ln) for a, ln, _, _, _ in batch])
    fn = _libc.process_vm_writev if write else _libc.process_vm_readv
    return bool(fn(pid, local, n, remote, n, 0) == sum(ln for _, ln, _, _, _ in batch))


def daemon_main(endpoint: str, pid: int, window_path: str, data_path: str) -> int:
    """The daemon's half: checked, batched process_vm_readv into the agent's window (or
    process_vm_writev out of it, for a batch of writes).

    ``data_path`` ``ipc`` or ``thread``: the data crosses the socket instead, as hmmirror's
    plain ``dma_read`` and ``dma_write`` do (the agent forwards the frames it received, not
    its shared memory); with ``thread`` the copy runs on a worker thread.
    """
    over_ipc = data_path != "shm"
    fd = os.open(window_path, os.O_RDWR)
    window = mmap.mmap(fd, SLOT * SLOTS)
    base = _address(window)
    pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    ctx = zmq.Context(1)
    sock = ctx.socket(zmq.ROUTER)
    _tune(sock)
    sock.bind(endpoint)
    print("daemon ready", flush=True)
    deadline = time.monotonic() + LIFETIME
    if data_path == "thread":
        return _threaded_daemon(sock, pid, pagemap, window, deadline)
    while time.monotonic() < deadline and not _orphaned():
        if not sock.poll(1000):
            continue
        ident, head, entries, *frames = sock.recv_multipart(copy=False)
        # [[addr, length, slot offset, first entry, write], ...]: all reads or all writes
        batch = msgpack.unpackb(head.bytes)
        named = np.frombuffer(entries.buffer, dtype=np.uint64)
        ok = _live_ok(pagemap, batch, named) and _vm_batch(pid, batch, base, frames)
        _answer(sock, pagemap, window, over_ipc, ident, batch, named, ok)
    return 0


def _answer(sock: zmq.Socket[Any], pagemap: int, window: mmap.mmap, over_ipc: bool, ident: Any,
            batch: list[list[int]], named: Any, ok: bool) -> None:  # fmt: skip
    """Answer a copied batch: a read is checked again after the copy, and its data goes
    back over the socket with ``over_ipc``."""
    write = bool(batch[0][4])
    if ok and not write:
        ok = _live_ok(pagemap, batch, named)
    if ok and over_ipc and not write:
        data = [window[off : off + ln] for _, ln, off, _, _ in batch]
        sock.send_multipart([ident, b"ok", *data], copy=batch[0][1] < 65536)
    else:
        sock.send_multipart([ident, b"ok" if ok else b"stale"])


def _threaded_daemon(sock: zmq.Socket[Any], pid: int, pagemap: int, window: mmap.mmap,
                     deadline: float) -> int:  # fmt: skip
    """The ``thread`` daemon: every batch checked on the loop, copied on a worker thread,
    checked again and answered on the loop once the thread says it is done."""
    base = _address(window)
    jobs: queue.SimpleQueue[tuple[Any, list[list[int]], Any, list[Any]] | None] = (
        queue.SimpleQueue()
    )
    finished: deque[tuple[Any, list[list[int]], Any, bool]] = deque()
    done = os.eventfd(0, os.EFD_NONBLOCK)

    def copier() -> None:
        while (job := jobs.get()) is not None:
            ident, batch, named, frames = job
            finished.append((ident, batch, named, _vm_batch(pid, batch, base, frames)))
            os.eventfd_write(done, 1)

    thread = threading.Thread(target=copier, daemon=True)
    thread.start()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(done, zmq.POLLIN)
    while time.monotonic() < deadline and not _orphaned():
        if not poller.poll(1000):
            continue
        while True:
            try:
                ident, head, entries, *frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            batch = msgpack.unpackb(head.bytes)
            named = np.frombuffer(entries.buffer, dtype=np.uint64)
            if _live_ok(pagemap, batch, named):
                jobs.put((ident, batch, named, frames))
            else:
                sock.send_multipart([ident, b"stale"])
        try:
            os.eventfd_read(done)
        except BlockingIOError:
            continue
        while finished:
            _answer(sock, pagemap, window, True, *finished.popleft())
    jobs.put(None)
    thread.join(1.0)
    return 0


def agent_main(pid: int, addr: int, length: int, data_path: str) -> int:
    """The agent's half: MTT check, one batched request to the daemon, the slices out (or,
    for writes, the data into the window first and an ``ok`` out).

    ``data_path`` is ``shm`` (the data stays in the shared window), ``ipc`` (it comes
    back over the daemon's socket) or ``thread`` (``ipc``, the daemon copying on a thread).
    """
    # The bench ends us with SIGTERM: leave through the with-blocks (temporary directory,
    # the daemon half) instead of dying on the spot.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    window_fd = os.memfd_create("hmmirror-ceiling")
    os.ftruncate(window_fd, SLOT * SLOTS)
    window = memoryview(mmap.mmap(window_fd, SLOT * SLOTS))
    # The MTT: the live pagemap entries, VALID (the target is populated and stays put).
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        mtt = np.frombuffer(f.read(length // PAGE * 8), dtype=np.uint64) & PFN | VALID
    with tempfile.TemporaryDirectory(prefix="hmmirror-ceiling-") as tmp:
        endpoint = f"ipc://{tmp}/daemon.sock"
        daemon = subprocess.Popen(
            [sys.executable, __file__, "daemon", endpoint, str(pid),
             f"/proc/{os.getpid()}/fd/{window_fd}", data_path],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert daemon.stdout is not None and "ready" in daemon.stdout.readline()
            return _agent_loop(pid, addr, mtt, window, endpoint, data_path != "shm")
        finally:
            daemon.kill()
            daemon.wait()


def _agent_loop(pid: int, addr: int, mtt: Any, window: memoryview, endpoint: str,
                over_ipc: bool) -> int:  # fmt: skip
    ctx = zmq.Context(1)
    front = ctx.socket(zmq.ROUTER)
    _tune(front)
    port = front.bind_to_random_port("tcp://127.0.0.1")
    back = ctx.socket(zmq.DEALER)
    _tune(back)
    back.connect(endpoint)
    print(f"ceiling ready tcp://127.0.0.1:{port}", flush=True)
    free = list(range(0, SLOT * SLOTS, SLOT))
    lent: list[tuple[int, zmq.MessageTracker]] = []
    waiting: list[list[tuple[bytes, int, int, int, bool]]] = []  # batches at the daemon
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    deadline = time.monotonic() + LIFETIME
    while time.monotonic() < deadline and not _orphaned():
        if not poller.poll(1000):
            continue
        batch: list[tuple[bytes, int, int, int, bool]] = []
        heads: list[list[int]] = []
        parts: list[Any] = []
        carried: list[Any] = []  # writes over ipc: the data frames, forwarded
        first = 0
        while True:
            if not free:  # reclaim the slots ZeroMQ has finished sending
                still: list[tuple[int, zmq.MessageTracker]] = []
                for off, tracker in lent:
                    if tracker.done:
                        free.append(off)
                    else:
                        still.append((off, tracker))
                lent = still
                if not free:
                    break
            try:
                ident, head, *data = front.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            rid, at, length = msgpack.unpackb(head.bytes)
            write = bool(data)
            if batch and batch[0][4] != write:  # the driver never mixes them (ceiling_block)
                raise RuntimeError("the ceiling got reads and writes in one batch")
            i = (at - addr) // PAGE
            n = length // PAGE
            entries = mtt[i : i + n]
            if not (entries & VALID).all():
                raise RuntimeError("the ceiling's MTT lost an entry")
            off = free.pop()
            if write and over_ipc:
                carried.append(data[0])
            elif write:
                window[off : off + length] = data[0].buffer  # the copy a WRITE adds
            batch.append((ident.bytes, rid, off, length, write))
            heads.append([at, length, off, first, int(write)])
            parts.append(entries)
            first += n
        if batch:
            back.send_multipart([msgpack.packb(heads), np.concatenate(parts), *carried],
                                copy=not carried)  # fmt: skip
            waiting.append(batch)
        while waiting:
            try:
                verdict, *data = back.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            if verdict.bytes != b"ok":
                raise RuntimeError("the ceiling's daemon refused a batch")
            for i, (ident, rid, off, length, write) in enumerate(waiting.pop(0)):
                head = msgpack.packb([rid, length])
                if write:
                    front.send_multipart([ident, head, b"ok"])
                    free.append(off)
                elif over_ipc:  # forward the frame that came over the socket
                    front.send_multipart([ident, head, data[i]], copy=length < 65536)
                    free.append(off)
                elif length < 65536:
                    front.send_multipart([ident, head, window[off : off + length]])
                    free.append(off)
                else:
                    frame = zmq.Frame(window[off : off + length], track=True)
                    front.send_multipart([ident, head, frame], copy=False)
                    assert frame.tracker is not None
                    lent.append((off, frame.tracker))
    return 0


def ceiling_block(sock: zmq.Socket[Any], addr: int, span: int, size: int, window: int,
                  seconds: float, write: bool = False) -> float:  # fmt: skip
    """Bytes per second READ (or WRITTEN) through the idealized pipeline in one block of
    ``seconds``."""
    n = 0
    payload = bytes(size)

    def post() -> None:
        nonlocal n
        head = msgpack.packb([n, addr + (n * size) % (span - size), size])
        if write:
            sock.send_multipart([head, payload], copy=size < 65536)
        else:
            sock.send(head)
        n += 1

    for _ in range(window):
        post()
    done = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        sock.recv_multipart(copy=False)
        done += 1
        if time.perf_counter() >= end:
            break
        post()
    elapsed = time.perf_counter() - t0
    for _ in range(window - 1):  # drain what is still in flight (untimed)
        sock.recv_multipart(copy=False)
    return done * size / elapsed


if __name__ == "__main__":
    if sys.argv[1:2] == ["daemon"]:
        sys.exit(daemon_main(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]))
    if sys.argv[1:2] == ["agent"]:
        sys.exit(agent_main(int(sys.argv[2]), int(sys.argv[3], 0), int(sys.argv[4]), sys.argv[5]))
    sys.exit(2)
