"""The RDMA service: remote requesters READ, WRITE and run atomics on a Nic's MRs.

One ROUTER socket, drained with ``loop.add_reader`` until ``EVENTS`` has no
POLLIN. Each request runs as a task (it may fault) under a deadline, and is
answered with the data, ``ok``, ``atomic_reply`` or an ``error`` whose code
follows the verbs semantics (``ErrorCode.REMOTE_ACCESS``, EPERM, EFAULT, ...).
READ data goes back as the very buffers hmmd's replies arrived in, zero-copy.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Sequence
from typing import Any

import zmq
from hmmirror.client.errors import AgentError, DeviceError, RemoteAccessError, RemoteError
from hmmirror.client.mlx5.nic import Nic
from hmmirror.proto.codec import Envelope, decode, encode
from hmmirror.proto.errors import ErrorCode, ProtocolError
from hmmirror.proto.messages import (
    STAT_MR_COLUMNS,
    AtomicOp,
    AtomicReply,
    Error,
    Message,
    Ok,
    RdmaAtomic,
    RdmaRead,
    RdmaReadReply,
    RdmaWrite,
    StatMr,
    StatMrReply,
)
from hmmirror.transport.sockets import Drained, send_frames, tune

log = logging.getLogger(__name__)

#: How long one request may take, faults and retries included, before it fails with EBUSY.
REQUEST_DEADLINE = 10.0
#: Requests in progress at once; more are refused with EBUSY (the RNR NAK of this model).
MAX_IN_FLIGHT = 1024
_ERRNO_CODES = {int(c): c for c in ErrorCode if c < 100}


def error_code(exc: BaseException) -> ErrorCode:
    """The wire code for a failed request."""
    if isinstance(exc, RemoteAccessError):
        return ErrorCode.REMOTE_ACCESS
    if isinstance(exc, OSError) and exc.errno in _ERRNO_CODES:
        return _ERRNO_CODES[exc.errno]
    if isinstance(exc, RemoteError) and isinstance(exc.code, ErrorCode):
        return exc.code
    if isinstance(exc, TimeoutError):
        return ErrorCode.EBUSY
    return ErrorCode.INTERNAL


class RdmaService(Drained):
    """Serves ``nic``'s MRs on ``endpoint`` (``tcp://host:port``; port 0 picks one)."""

    def __init__(self, nic: Nic, endpoint: str) -> None:
        self.nic = nic
        # The session's context: one ZeroMQ I/O thread for both sockets, one less to wake.
        sock = nic.session.ctx.socket(zmq.ROUTER)
        tune(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
            port = sock.bind_to_random_port(endpoint[: -len(":0")])
            endpoint = f"{endpoint[: -len(':0')]}:{port}"
        else:
            sock.bind(endpoint)
        self.endpoint = endpoint
        self._watch(sock)
        self._tasks: set[asyncio.Task[None]] = set()
        self.counters = dict.fromkeys(
            ("requests", "reads", "writes", "atomics", "errors", "bad_messages", "unroutable"), 0
        )

    async def close(self) -> None:
        """Stop serving: cancel requests in progress and close the socket."""
        self._unwatch()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.close(linger=0)

    # --- inbound --------------------------------------------------------------------------------

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        """A request: the peer's identity frame, then the message."""
        self._handle(frames[0].bytes, frames[1:])

    def _handle(self, identity: bytes, frames: Sequence[zmq.Frame]) -> None:
        """Decode one request and start it; a malformed one is answered and counted."""
        try:
            env = decode(frames)
        except ProtocolError as exc:
            self.counters["bad_messages"] += 1
            # exc.id names the request once its header was readable: the requester's
            # pending request then fails at once rather than timing out.
            self._reply(identity, Error(code=int(exc.code), message=str(exc)[:1024]), exc.id)
            return
        self.counters["requests"] += 1
        msg = env.msg
        if isinstance(msg, StatMr):
            self._reply(identity, self._stat(), env.id)
            return
        if not isinstance(msg, RdmaRead | RdmaWrite | RdmaAtomic):
            self.counters["bad_messages"] += 1
            text = f"hm-agent does not accept {env.type!r}"
            self._reply(identity, Error(code=int(ErrorCode.UNKNOWN_MESSAGE), message=text), env.id)
            return
        if len(self._tasks) >= MAX_IN_FLIGHT:
            text = f"{MAX_IN_FLIGHT} requests already in progress"
            self._reply(identity, Error(code=int(ErrorCode.EBUSY), message=text), env.id)
            return
        task = asyncio.ensure_future(self._serve(identity, env))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, identity: bytes, env: Envelope) -> None:
        """Perform one RDMA request and answer it."""
        msg = env.msg
        try:
            async with asyncio.timeout(REQUEST_DEADLINE):
                if isinstance(msg, RdmaRead):
                    self.counters["reads"] += 1
                    pieces = await self.nic.read(msg.rkey, msg.addr, msg.length)
                    data: Any = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    self._reply(identity, RdmaReadReply(length=msg.length), env.id, [data])
                    return
                if isinstance(msg, RdmaWrite):
                    self.counters["writes"] += 1
                    await self.nic.write(msg.rkey, msg.addr, env.bulk[0])
                    self._reply(identity, Ok(), env.id)
                    return
                assert isinstance(msg, RdmaAtomic)
                self.counters["atomics"] += 1
                try:
                    op = AtomicOp(msg.op)
                except ValueError as exc:
                    raise DeviceError(errno.EINVAL, f"unknown atomic op {msg.op}") from exc
                old = await self.nic.atomic(msg.rkey, msg.addr, op, msg.compare_add, msg.swap)
                self._reply(identity, AtomicReply(old=old), env.id)
        except (AgentError, OSError, TimeoutError) as exc:
            self.counters["errors"] += 1
            text = str(exc) or type(exc).__name__
            self._reply(identity, Error(code=int(error_code(exc)), message=text[:1024]), env.id)
        except Exception as exc:
            log.exception("RDMA %s failed", env.type)
            self.counters["errors"] += 1
            text = f"{type(exc).__name__}: {exc}"[:1024]
            self._reply(identity, Error(code=int(ErrorCode.INTERNAL), message=text), env.id)

    def _stat(self) -> StatMrReply:
        """The ``stat_mr_reply`` for the Nic's MRs."""
        rows: list[int] = []
        for row in self.nic.stat_mr()[:4096]:
            rows.extend(row[name] for name in STAT_MR_COLUMNS)
        return StatMrReply(device=self.nic.name[:64], rows=tuple(rows))

    # --- outbound -------------------------------------------------------------------------------

    def _reply(self, identity: bytes, msg: Message, re: int, bulk: Sequence[Any] = ()) -> None:
        """Send ``msg`` to ``identity``; a requester that left is counted, not an error."""
        try:
            send_frames(self.sock, [identity, *encode(msg, 0, re, bulk)], copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (ROUTER_MANDATORY) or a full queue
            self.counters["unroutable"] += 1
            log.debug("reply to a requester dropped: %s", exc)
        self._sent()
