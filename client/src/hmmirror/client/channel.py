"""A request channel: one DEALER socket, a drain loop, and requests with deadlines.

This is what every client-side connection shares: the agent's session with
hmmd and an RDMA requester's connection to an ``hm-agent``. The socket is a
plain pyzmq DEALER registered with ``loop.add_reader`` and drained until
``EVENTS`` has no POLLIN (its FD is edge-triggered). A reply settles the
request it names; anything else goes to ``_on_push``, which subclasses define.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Sequence
from typing import Any, cast

import zmq
import zmq.backend
from hmmirror.client.curve import CurveKeys
from hmmirror.client.errors import DaemonUnavailable, RemoteError, RequestTimeout
from hmmirror.proto.codec import Envelope, decode, encode
from hmmirror.proto.errors import ErrorCode, ProtocolError
from hmmirror.proto.messages import MAX_FRAME, Error, Hello, Message

log = logging.getLogger(__name__)

# pyzmq's constants are IntFlag enums; enum arithmetic on the hot path costs
# microseconds per call, plain ints nothing.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
#: The Cython send itself: pyzmq's Python wrapper around it only handles DRAFT routing
#: ids and groups, which hmmirror never uses, and costs a quarter of a small send.
_zmq_send = zmq.backend.Socket.send
#: Frames this large go out zero-copy when the caller allows it (pyzmq's break-even).
ZERO_COPY_MIN = 64 * 1024
#: Kernel socket buffers asked for (capped by net.core.[rw]mem_max): megabyte transfers
#: then take a few large writes instead of many small ones.
SOCKET_BUFFER = 4 << 20


def tune(sock: zmq.Socket[Any]) -> None:
    """The socket options every hmmirror connection uses: no linger, size caps, buffers."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
    sock.setsockopt(zmq.SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(zmq.RCVBUF, SOCKET_BUFFER)
    sock.setsockopt(zmq.SNDHWM, 10000)
    sock.setsockopt(zmq.RCVHWM, 10000)


def send_frames(sock: zmq.Socket[Any], frames: Sequence[Any], copy: bool) -> None:
    """Send one message without blocking; only large frames go zero-copy (with ``copy`` off)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _zmq_send(
            sock, frame, _NOBLOCK | (_SNDMORE if i < last else 0),
            copy or len(frame) < ZERO_COPY_MIN,
        )  # fmt: skip


def _expire(fut: asyncio.Future[Envelope]) -> None:
    """The request's timer fired: fail ``fut`` with TimeoutError unless it was answered."""
    if not fut.done():
        fut.set_exception(TimeoutError())


class Drained(abc.ABC):
    """A plain pyzmq socket on the event loop: ``loop.add_reader`` on its edge-triggered FD.

    ``_drain`` receives every queued message and hands its frames to
    ``_on_frames``; a send may consume the FD's POLLIN edge, so ``_sent`` makes
    the loop look again once per tick (never once per send), or right away when
    called from inside the drain loop, whose own ``EVENTS`` check covers it.
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

    def _unwatch(self) -> None:
        """Stop draining (the caller closes the socket)."""
        self.loop.remove_reader(self._fd)

    @abc.abstractmethod
    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        """One inbound message's frames."""

    def _drain(self) -> None:
        """Handle every queued message (the FD is edge-triggered: drain fully).

        ``EVENTS`` is read after every message, so it also catches an edge that
        a send made while handling (an ACK) may have consumed.
        """
        self._draining = True
        try:
            sock = self.sock
            while cast(int, sock.get(_EVENTS)) & _POLLIN:
                try:
                    # Frames carry their own "more" flag: no RCVMORE query (an enum
                    # conversion plus a getsockopt) per frame.
                    frame = sock.recv(_NOBLOCK, copy=False)
                    frames = [frame]
                    while frame.more:
                        frame = sock.recv(_NOBLOCK, copy=False)
                        frames.append(frame)
                except zmq.Again:
                    break
                self._on_frames(frames)
        finally:
            self._draining = False

    def _sent(self) -> None:
        """A send happened: make sure its consumed edge does not strand inbound messages."""
        if not self._draining and not self._recheck:
            self._recheck = True
            self.loop.call_soon(self._after_sends)

    def _after_sends(self) -> None:
        """Drain if this tick's sends consumed the FD's POLLIN edge."""
        self._recheck = False
        if not self.sock.closed and cast(int, self.sock.get(_EVENTS)) & _POLLIN:
            self._drain()


class Channel(Drained):
    """A DEALER connection to ``endpoint`` on the running loop; ``what`` names the peer."""

    #: The peer, for messages ("hmmd", "hm-agent").
    what = "peer"

    def __init__(self, endpoint: str, timeout: float, curve: CurveKeys | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.DEALER)
        tune(sock)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if curve is not None:
            curve.apply(sock)
        sock.connect(endpoint)
        self._watch(sock)
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[Envelope]] = {}
        self.lost: str | None = None
        self._closed = False

    def _close_socket(self) -> None:
        """Fail every pending request and close the socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._unwatch()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(DaemonUnavailable(f"connection to {self.endpoint} closed"))
        self.sock.close(linger=0)
        self.ctx.term()

    # --- outbound -------------------------------------------------------------------------------

    def _send(self, msg: Message, re: int = 0, bulk: Sequence[Any] = (), copy: bool = True) -> int:
        """Encode and send ``msg`` under a fresh id; return the id."""
        msg_id = self._next_id
        self._next_id += 1
        self._send_frames(encode(msg, msg_id, re, bulk), copy)
        return msg_id

    def _send_frames(self, frames: list[Any], copy: bool = True) -> None:
        """Send ``frames`` without blocking; DaemonUnavailable if the queue is full."""
        try:
            send_frames(self.sock, frames, copy)
        except zmq.Again as exc:
            raise DaemonUnavailable(f"send queue to {self.endpoint} is full") from exc
        finally:
            self._sent()

    async def request(
        self,
        msg: Message,
        bulk: Sequence[Any] = (),
        *,
        timeout: float | None = None,
        expect: type[Message] | None = None,
        copy: bool = True,
    ) -> Envelope:
        """Send ``msg``, await its reply; raise RemoteError, RequestTimeout or DaemonUnavailable."""
        if self.lost is not None and not isinstance(msg, Hello):
            raise DaemonUnavailable(self.lost)
        if self._closed:
            raise DaemonUnavailable(f"connection to {self.endpoint} closed")
        fut: asyncio.Future[Envelope] = self.loop.create_future()
        msg_id = self._next_id
        self._pending[msg_id] = fut
        try:
            self._send(msg, bulk=bulk, copy=copy)
            wait = self.timeout if timeout is None else timeout
            # A timer, not asyncio.wait_for: no extra task per request on the hot path.
            timer = self.loop.call_later(wait, _expire, fut)
            try:
                env = await fut
            except TimeoutError as exc:
                raise RequestTimeout(
                    f"no reply to {msg.TYPE} id={msg_id} from {self.what} at {self.endpoint} "
                    f"in {wait:g} s; it may have taken effect"
                ) from exc
            finally:
                timer.cancel()
        finally:
            self._pending.pop(msg_id, None)
        if isinstance(env.msg, Error):
            raise RemoteError(env.msg.code, env.msg.message)
        if expect is not None and not isinstance(env.msg, expect):
            raise RemoteError(ErrorCode.BAD_MESSAGE, f"expected {expect.TYPE}, got {env.type}")
        return env

    # --- inbound --------------------------------------------------------------------------------

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        """Decode one inbound message: settle the request it answers, or pass it on."""
        try:
            env = decode(frames)
        except ProtocolError as exc:
            log.warning("dropped a malformed message from %s: %s", self.what, exc)
            return
        if env.re:
            fut = self._pending.get(env.re)
            if fut is not None and not fut.done():
                fut.set_result(env)
        else:
            self._on_push(env)

    def _on_push(self, env: Envelope) -> None:
        """A message that answers no request; the base class ignores it."""
        log.debug("ignored an unsolicited %s from %s", env.type, self.what)
