"""What every hmmirror ZeroMQ socket shares: its context, options, a non-blocking send, and
the drain loop.

A plain (not ``zmq.asyncio``) socket is registered with ``loop.add_reader`` on
its edge-triggered FD; the reader drains until ``EVENTS`` shows no POLLIN, and
a send may consume the edge (pyzmq #1177), so ``EVENTS`` is read after each
send too. This is the measured-fastest pattern on these machines
(docs/ARCHITECTURE.md §B).
"""

from __future__ import annotations

import abc
import asyncio
import os
from collections.abc import Sequence
from typing import Any, cast

import zmq
import zmq.backend
from hmmirror.proto.messages import MAX_FRAME

# pyzmq's constants are IntFlag enums; enum arithmetic on the hot path costs
# microseconds per call, plain ints nothing.
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
POLLOUT = int(zmq.POLLOUT)
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)
_MORE = NOBLOCK | SNDMORE
#: The Cython send itself: pyzmq's Python wrapper around it only handles DRAFT routing
#: ids and groups, which hmmirror never uses, and costs a quarter of a small send.
zmq_send = zmq.backend.Socket.send
#: Frames this large go out zero-copy when the caller allows it (pyzmq's break-even).
ZERO_COPY_MIN = 64 * 1024
#: Kernel socket buffers asked for (capped by net.core.[rw]mem_max): megabyte transfers
#: then take a few large writes instead of many small ones.
SOCKET_BUFFER = 4 << 20
#: Messages queued per peer and direction before a send fails (EAGAIN) or input stops.
HWM = 10000
#: Messages one drain handles before it gives the loop back (and comes back on the next
#: turn): a peer that keeps the queue full must not keep timers, leases, the door and the
#: other sockets waiting. A few milliseconds of handling; a pipelined burst of 64 fits.
DRAIN_BUDGET = 256


#: The scheduling policy of libzmq's own threads (its I/O thread and reaper): see ``context``.
IO_THREAD_POLICY = os.SCHED_BATCH


def context() -> zmq.Context[zmq.Socket[Any]]:
    """A new ZeroMQ context whose threads run under ``SCHED_BATCH``.

    Each send to a peer whose pipe is empty wakes the context's I/O thread. As a normal
    thread, the woken I/O thread preempts the sender on its core at once, writes that one
    message, and sleeps; the sender's next send wakes it again. Under ``SCHED_BATCH`` a
    wake-up does not preempt (the kernel's ``check_preempt_wakeup_fair``): the I/O thread
    runs on an idle core, or once the sender's loop waits, and writes what queued meanwhile
    in one go. The policy keeps the thread's nice value, and needs no privilege; libzmq
    applies it as each thread starts (``ZMQ_THREAD_SCHED_POLICY``). Measured in
    docs/ARCHITECTURE.md §B.
    """
    ctx: zmq.Context[zmq.Socket[Any]] = zmq.Context()
    ctx.set(zmq.THREAD_SCHED_POLICY, IO_THREAD_POLICY)
    return ctx


def tune(sock: zmq.Socket[Any]) -> None:
    """The options every hmmirror socket uses: no linger, size caps, buffers, HWMs, and
    IPv6 (libzmq refuses an IPv6 address without it; IPv4 ones still work)."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
    sock.setsockopt(zmq.SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(zmq.RCVBUF, SOCKET_BUFFER)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)


def send_frames(sock: zmq.Socket[Any], frames: Sequence[Any], copy: bool) -> None:
    """Send one message without blocking; only large frames go zero-copy (with ``copy`` off).

    Raises ``zmq.Again`` when the peer's pipe is full and ``zmq.ZMQError`` otherwise (the
    caller translates them with ``errors.unreachable``). A socket queues nothing until the
    last frame, so a failure leaves no partial message.
    """
    last = len(frames) - 1
    if last < 0:
        return
    if copy:  # every reply but bulk DMA data: no per-frame size test
        for i in range(last):
            zmq_send(sock, frames[i], _MORE, True)
        zmq_send(sock, frames[last], NOBLOCK, True)
        return
    for i, frame in enumerate(frames):
        zmq_send(sock, frame, NOBLOCK | (SNDMORE if i < last else 0), len(frame) < ZERO_COPY_MIN)


class Drained(abc.ABC):
    """A plain pyzmq socket on the event loop: ``loop.add_reader`` on its edge-triggered FD.

    ``_drain`` receives every queued message and hands its frames to
    ``_on_frames``; a send may consume the FD's POLLIN edge, so ``_sent`` reads
    ``EVENTS`` right after a send made outside the drain loop (whose own read
    covers it) and has the loop drain only if that shows input.
    """

    sock: zmq.Socket[Any]
    loop: asyncio.AbstractEventLoop

    def _watch(self, sock: zmq.Socket[Any]) -> None:
        """Start draining ``sock`` on the running loop."""
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._recheck = False
        self._draining = False
        self.loop.add_reader(self._fd, self._drain)
        self.loop.call_soon(self._after_sends)  # messages may have queued before the reader

    def _unwatch(self) -> None:
        """Stop draining (the caller closes the socket)."""
        self.loop.remove_reader(self._fd)

    @abc.abstractmethod
    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        """One inbound message's frames."""

    def _drain(self) -> None:
        """Handle the queued messages (the FD is edge-triggered: drain fully, in turns).

        It runs when the FD fired or ``_after_sends`` saw POLLIN, so a message is
        almost always there: the first look is the ``recv`` itself, whose EAGAIN
        (a ``recv`` processes the socket's commands first, as an ``EVENTS`` read
        does) says when none is. After each message ``EVENTS`` is read, which
        re-arms the edge and also catches one that a send made while handling (an
        ACK) may have consumed. After ``DRAIN_BUDGET`` messages it stops and has
        the loop call it again on its next turn (``_after_sends``): the edge will not.
        """
        self._draining = True
        try:
            sock = self.sock
            look = False
            budget = DRAIN_BUDGET
            # A handler may close the socket (a connection dropped by its own message).
            while not sock.closed:
                if look and not cast(int, sock.get(EVENTS)) & POLLIN:
                    break
                if not budget:
                    if not self._recheck:
                        self._recheck = True
                        self.loop.call_soon(self._after_sends)
                    break
                budget -= 1
                look = True
                try:
                    # Frames carry their own "more" flag: no RCVMORE query (an enum
                    # conversion plus a getsockopt) per frame.
                    frame = sock.recv(NOBLOCK, copy=False)
                    frames = [frame]
                    while frame.more:
                        frame = sock.recv(NOBLOCK, copy=False)
                        frames.append(frame)
                except zmq.Again:
                    break
                self._on_frames(frames)
        finally:
            self._draining = False

    def _sent(self) -> None:
        """A send happened: make sure its consumed edge does not strand inbound messages.

        ``EVENTS`` is read at once (it re-arms the edge, as the drain loop's own read
        does): only when it shows input does the loop come back to drain it, so a send
        costs no extra loop turn. Inside the drain loop its own read covers the send.
        """
        if self._draining or self._recheck or self.sock.closed:
            return
        try:
            ready = cast(int, self.sock.get(EVENTS)) & POLLIN
        except zmq.ZMQError:  # a context shutting down: the loop's look reports it, not the send
            ready = True
        if ready:
            self._recheck = True
            self.loop.call_soon(self._after_sends)

    def _after_sends(self) -> None:
        """Drain if this tick's sends consumed the FD's POLLIN edge."""
        self._recheck = False
        if not self.sock.closed and cast(int, self.sock.get(EVENTS)) & POLLIN:
            self._drain()
