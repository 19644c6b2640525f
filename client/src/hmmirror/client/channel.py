"""A request channel: one DEALER socket, a drain loop, and requests with deadlines.

This is what every client-side connection shares: the agent's session with
hmmd and an RDMA requester's connection to an ``hm-agent``. The socket comes
from ``hmmirror.transport.Dialer`` (an ``ipc://`` server is reached through its
side door, once, before the first request) and is drained on the event loop
(``hmmirror.transport.Drained``). A reply settles the request it names;
anything else goes to ``_on_push``, which subclasses define.

``call`` and ``exchange`` are the typed requests: the caller names the reply's
type and gets that type back (``UnexpectedReply`` if the peer sent another).
``request`` is the untyped form underneath, for callers that take any reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import zmq
from hmmirror.client.errors import (
    DaemonUnavailable,
    RemoteError,
    RequestTimeout,
    UnexpectedReply,
)
from hmmirror.proto.codec import Envelope, decode, encode
from hmmirror.proto.errors import ProtocolError
from hmmirror.proto.messages import Error, Hello, Message
from hmmirror.transport import CurveKeys, Dialer, DoorError, Drained
from hmmirror.transport.errors import unreachable
from hmmirror.transport.sockets import context, send_frames

log = logging.getLogger(__name__)

#: A reply's message type, as the caller of a typed request names it.
R = TypeVar("R", bound=Message)
#: Requests that only read: one that times out changed nothing, whatever became of it.
_READS = frozenset({"status", "inventory", "heartbeat", "stat_mr", "rdma_read", "dma_read"})


class Unsent(DaemonUnavailable):
    """Our own socket refused the request (a full send queue, or no peer at all): it never
    left, so sending it again cannot repeat it."""


def _expire(fut: asyncio.Future[Envelope]) -> None:
    """The request's timer fired: fail ``fut`` with TimeoutError unless it was answered."""
    if not fut.done():
        fut.set_exception(TimeoutError())


class Channel(Drained):
    """A DEALER connection to ``endpoint`` on the running loop; ``what`` names the peer."""

    #: The peer, for messages ("hmmd", "hm-agent").
    what = "peer"

    def __init__(
        self,
        endpoint: str,
        timeout: float,
        curve: CurveKeys | None = None,
        options: Mapping[int, int] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.curve = curve
        self.options = options
        self.ctx = context()
        try:
            self._dialer = Dialer(self.ctx, endpoint, curve, options)
        except (OSError, ValueError, zmq.ZMQError) as exc:
            self.ctx.term()
            raise DaemonUnavailable(f"cannot reach {self.what} at {endpoint}: {exc}") from exc
        self._watch(self._dialer.sock)
        self._dialing: asyncio.Future[None] | None = None
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[Envelope]] = {}
        self.lost: str | None = None
        self._closed = False

    async def _dial(self, timeout: float) -> None:
        """Reach an ``ipc://`` server through its side door (once; concurrent callers wait)."""
        if self._dialer.closed and not self._closed:
            # The last dial failed and closed its socket (a server may still connect to
            # its port late): a new Dialer knocks, the failed one is never used again.
            self._new_dialer()
        if self._dialing is None or self._dialing.done():
            self._dialing = asyncio.ensure_future(self._dialer.dial(timeout))
        try:
            await asyncio.shield(self._dialing)
        except DoorError as exc:
            raise DaemonUnavailable(
                f"cannot connect to {self.what} at {self.endpoint}: {exc.why}"
            ) from exc
        except asyncio.CancelledError:
            # ``close`` cancelled the dial: the requests waiting on it fail as any request
            # on a closed connection does. A cancel of the caller's own task goes on.
            task = asyncio.current_task()
            if not self._closed or (task is not None and task.cancelling()):
                raise
            raise DaemonUnavailable(f"connection to {self.endpoint} closed") from None

    async def redial(self) -> None:
        """A fresh connection to a server that dropped (or lost) this one: knock again."""
        if self._closed:
            return
        self._new_dialer()
        await self._dial(self.timeout)

    def _new_dialer(self) -> None:
        """Drain a new Dialer's socket in place of the current one, which is closed."""
        self._unwatch()
        self._dialer.close()
        self._dialer = Dialer(self.ctx, self.endpoint, self.curve, self.options)
        self._dialing = None
        self._watch(self._dialer.sock)

    def _close_socket(self) -> None:
        """Fail every pending request and close the socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._unwatch()
        if self._dialing is not None:
            self._dialing.cancel()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(DaemonUnavailable(f"connection to {self.endpoint} closed"))
        self._dialer.close()
        self.ctx.term()

    # --- outbound -------------------------------------------------------------------------------

    def _send(self, msg: Message, re: int = 0, bulk: Sequence[Any] = (), copy: bool = True) -> int:
        """Encode and send ``msg`` under a fresh id; return the id."""
        msg_id = self._next_id
        self._next_id += 1
        self._send_frames(encode(msg, msg_id, re, bulk), copy)
        return msg_id

    def _send_frames(self, frames: list[Any], copy: bool = True) -> None:
        """Send ``frames`` without blocking; Unsent if the queue is full (or has no peer)."""
        try:
            send_frames(self.sock, frames, copy)
        except zmq.Again as exc:
            where = f"{self.what} at {self.endpoint}"
            raise Unsent(str(unreachable(exc, where))) from exc
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
        if not self._dialer.ready:
            await self._dial(self.timeout if timeout is None else timeout)
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
                effect = "it changed nothing" if msg.TYPE in _READS else "it may have taken effect"
                raise RequestTimeout(
                    f"no reply to {msg.TYPE} id={msg_id} from {self.what} at {self.endpoint} "
                    f"in {wait:g} s; {effect}"
                ) from exc
            finally:
                timer.cancel()
        finally:
            self._pending.pop(msg_id, None)
        if isinstance(env.msg, Error):
            raise RemoteError(env.msg.code, env.msg.message, env.msg.owner)
        if expect is not None and not isinstance(env.msg, expect):
            raise UnexpectedReply(expect.TYPE, env.type)
        return env

    async def exchange(
        self,
        msg: Message,
        expect: type[R] | tuple[type[R], ...],
        bulk: Sequence[Any] = (),
        *,
        timeout: float | None = None,
        copy: bool = True,
    ) -> tuple[R, tuple[memoryview, ...]]:
        """Send ``msg``; return its reply, of type ``expect`` (or one of them), and the
        reply's bulk frames. UnexpectedReply if it is of another type; otherwise raises
        as ``request`` does."""
        env = await self.request(msg, bulk, timeout=timeout, copy=copy)
        if not isinstance(env.msg, expect):
            kinds = expect if isinstance(expect, tuple) else (expect,)
            raise UnexpectedReply(" or ".join(k.TYPE for k in kinds), env.type)
        return env.msg, env.bulk

    async def call(self, msg: Message, expect: type[R], *, timeout: float | None = None) -> R:
        """Send ``msg``; return its reply, of type ``expect`` (UnexpectedReply otherwise)."""
        return (await self.exchange(msg, expect, timeout=timeout))[0]

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
