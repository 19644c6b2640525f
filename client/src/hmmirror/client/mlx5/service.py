"""The RDMA service: remote requesters READ, WRITE and run atomics on a Nic's MRs.

One ROUTER socket, drained with ``loop.add_reader`` until ``EVENTS`` has no
POLLIN. Each request runs as a task (it may fault) under a deadline, and is
answered with the data, ``ok``, ``atomic_reply`` or an ``error`` whose code
follows the verbs semantics (``ErrorCode.REMOTE_ACCESS``, EPERM, EFAULT, ...).
READ data goes back as the very buffers hmmd's replies arrived in, zero-copy,
or, when the session has a DMA window (SPEC §4.9), straight from the window's
slot hmmd read it into, which is lent until libzmq has sent it.

Who asks is what the listener proved (``requester_of``): a ``tcp://`` listener
is a CURVE server whose ZAP handler admits only the keys in an allow-list
directory (``listen``), unless it was made plain TCP with ``insecure``; an
``ipc://`` listener knows its peers' uids. Every access is checked against the
``Grants`` first: an MR the requester holds no grant on is, to it, an unknown
rkey. ``stat_mr`` answers authenticated requesters only, about their MRs only.

A small READ whose translations are all present needs no task: it joins the
mirror's coalesced ``dma_read`` of this turn of the loop (``Nic.read_now``) and is
answered from that reply's callback, within the session's request deadline. At 4
KiB the task, its deadline and the layers between were most of the agent's cost
per READ (bench/README §4). If that read is refused (an invalidation came between,
say), the READ takes the task's path after all, which faults and retries.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Sequence
from typing import Any

import zmq
from hmmirror.client.errors import AgentError, DeviceError, RemoteAccessError, RemoteError
from hmmirror.client.mlx5.grants import Grants
from hmmirror.client.mlx5.nic import Nic
from hmmirror.client.mlx5.verbs import AccessFlags
from hmmirror.client.window import Slot
from hmmirror.proto.codec import Envelope, decode, encode
from hmmirror.proto.errors import CODE_OF_ERRNO, ErrorCode, ProtocolError
from hmmirror.proto.messages import (
    STAT_MR_COLUMNS,
    AtomicOp,
    AtomicReply,
    Error,
    Goodbye,
    Message,
    Ok,
    RdmaAtomic,
    RdmaRead,
    RdmaReadReply,
    RdmaWrite,
    StatMr,
    StatMrReply,
)
from hmmirror.transport import (
    AddressInUse,
    AllowDir,
    CertificateError,
    Connection,
    Server,
    ServerKeys,
    Unreachable,
)
from hmmirror.transport.budget import ReplyBudget, frame_bytes

log = logging.getLogger(__name__)

#: How long one request may take, faults and retries included, before it fails with EBUSY.
REQUEST_DEADLINE = 10.0
#: Requests in progress at once; more are refused with EBUSY (the RNR NAK of this model).
MAX_IN_FLIGHT = 1024
#: Reply bytes queued (or being read) for one requester; beyond it its requests get EAGAIN,
#: so a requester that never reads its socket holds at most this much of the agent's memory.
REPLY_CAP = 32 << 20
#: How long a requester may stay at its cap without reading before it is counted as stalled.
REPLY_STALL = 2.0
#: Requests between two sweeps of the reply budget (which forgets idle requesters).
SWEEP_EVERY = 1024
#: How long the ``ok`` to a requester's ``goodbye`` (and any reply still queued to it) may
#: take to leave once its connection is closed (libzmq closes it in the background). Short:
#: the socket is no longer counted against any place or cap meanwhile, and the requester
#: needs no ``ok`` (it waits a moment for one, then closes anyway).
GOODBYE_LINGER_MS = 250
_NEEDS = {
    RdmaRead: AccessFlags.REMOTE_READ,
    RdmaWrite: AccessFlags.REMOTE_WRITE,
    RdmaAtomic: AccessFlags.REMOTE_ATOMIC,
}


class ListenError(Exception):
    """The RDMA endpoint cannot be served: a bad scheme, an address in use, unusable keys."""


def requester_of(conn: Connection) -> str | None:
    """Who sent a request, as the listener proved it: ``curve:KEY`` (a CURVE key the
    allow-list admitted), ``uid:N`` (SO_PEERCRED on ``ipc://``), or None (plain TCP, with
    ``insecure``: nobody). Nothing the peer *says* counts."""
    identity = conn.peer.identity
    return None if identity == "unknown" else identity


def error_code(exc: BaseException) -> ErrorCode:
    """The wire code for a failed request."""
    if isinstance(exc, RemoteAccessError):
        return ErrorCode.REMOTE_ACCESS
    if isinstance(exc, OSError) and exc.errno in CODE_OF_ERRNO:
        return CODE_OF_ERRNO[exc.errno]
    if isinstance(exc, RemoteError) and isinstance(exc.code, ErrorCode):
        return exc.code
    if isinstance(exc, TimeoutError):
        return ErrorCode.EBUSY
    return ErrorCode.INTERNAL


class RdmaService:
    """Serves ``nic``'s MRs on ``endpoint`` to the requesters ``grants`` name.

    ``tcp://host:port`` (port 0 picks one) needs ``key_file`` and ``allow_dir``,
    or ``insecure``; ``ipc://PATH`` needs neither (the socket is mode 0666: grants,
    not its mode, say who may do what). The constructor opens the listener's door
    (or raises ListenError); ``start`` begins serving what queued meanwhile.
    """

    def __init__(
        self,
        nic: Nic,
        endpoint: str,
        *,
        grants: Grants | None = None,
        key_file: str = "",
        allow_dir: str = "",
        insecure: bool = False,
        reply_cap: int = REPLY_CAP,
    ) -> None:
        self.nic = nic
        self.budget = ReplyBudget(reply_cap, REPLY_STALL)
        #: Replaced whole on a reload; a request is checked against the table of its arrival.
        self.grants = grants or Grants()
        tcp = endpoint.startswith("tcp://")
        try:
            if tcp and key_file and not allow_dir:
                raise ListenError(f"{endpoint}: listen_key needs listen_allow (a directory)")
            keys = ServerKeys.load(key_file) if tcp and key_file else None
            allow = AllowDir(allow_dir) if keys is not None else None
            if allow is not None and not allow.readable():
                raise ListenError(f"listen_allow: {allow_dir!r} is not a readable directory")
            # The session's context: one ZeroMQ I/O thread for both sockets, one less to wake.
            self.server = Server(
                endpoint, self._on_message, ctx=nic.session.ctx, keys=keys, allow=allow,
                insecure=insecure, group="", mode=0o666,
            )  # fmt: skip
        except (ValueError, CertificateError) as exc:
            raise ListenError(str(exc)) from exc
        try:
            self.server.open()
        except (AddressInUse, OSError) as exc:
            self.server.close()
            raise ListenError(f"cannot listen on {endpoint}: {exc}") from exc
        self.endpoint = self.server.endpoint
        self._tasks: set[asyncio.Task[None]] = set()
        #: READs in progress without a task (``Nic.read_now``).
        self._quick_reads = 0
        self._closing = False
        self._since_sweep = 0
        self.counters = dict.fromkeys(
            ("requests", "reads", "writes", "atomics", "errors", "bad_messages", "unroutable",
             "refused"), 0,
        )  # fmt: skip

    def start(self) -> None:
        """Begin serving on the running loop (requests that arrived since the door opened
        first)."""
        self.server.start()

    def reload(self) -> None:
        """Read the allow-list directory again at the next handshake."""
        if self.server.zap is not None:
            self.server.zap.allow.reload()

    async def close(self) -> None:
        """Stop serving: cancel requests in progress, close the listener."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.server.close()

    # --- inbound --------------------------------------------------------------------------------

    def _on_message(self, conn: Connection, frames: Sequence[zmq.Frame]) -> None:
        """A request on ``conn``."""
        self._handle(conn.rid, frames, requester_of(conn))

    def _handle(self, identity: bytes, frames: Sequence[zmq.Frame], requester: str | None) -> None:
        """Decode one request, check it against the grants and start it; a malformed or
        refused one is answered and counted."""
        self._since_sweep += 1
        if self._since_sweep >= SWEEP_EVERY:
            # Forget the requesters that took everything, every SWEEP_EVERY messages of any
            # kind: one that only sends garbage, or is refused, or leaves without a word, is
            # counted too (its answers are), and must not stay.
            self._since_sweep = 0
            self.budget.sweep()
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
            if requester is None:
                self.counters["refused"] += 1
                text = "stat_mr answers authenticated requesters only"
                self._reply(identity, Error(code=int(ErrorCode.PERMISSION_DENIED), message=text),
                            env.id)  # fmt: skip
                return
            if not self._over_budget(identity, msg, env.id):
                self._reply(identity, self._stat(requester), env.id)
            return
        if isinstance(msg, Goodbye):
            # The requester is leaving (SPEC §4.7, 1.2): its connection's place (of the 32
            # one address or uid may hold) comes back now, not when it has been silent long.
            self._reply(identity, Ok(), env.id)
            self.server.drop(identity, GOODBYE_LINGER_MS)
            self.budget.forget(identity)
            return
        if not isinstance(msg, RdmaRead | RdmaWrite | RdmaAtomic):
            self.counters["bad_messages"] += 1
            text = f"hm-agent does not accept {env.type!r}"
            self._reply(identity, Error(code=int(ErrorCode.UNKNOWN_MESSAGE), message=text), env.id)
            return
        refusal = self._refusal(requester, msg)
        if refusal is not None:
            self.counters["refused"] += 1
            self.counters["errors"] += 1
            error = Error(code=int(ErrorCode.REMOTE_ACCESS), message=refusal)
            self._reply(identity, error, env.id)
            return
        if len(self._tasks) + self._quick_reads >= MAX_IN_FLIGHT:
            text = f"{MAX_IN_FLIGHT} requests already in progress"
            self._reply(identity, Error(code=int(ErrorCode.EBUSY), message=text), env.id)
            return
        if self._over_budget(identity, msg, env.id):
            return
        deadline = asyncio.get_running_loop().time() + REQUEST_DEADLINE
        if isinstance(msg, RdmaRead):
            got = self.nic.read_now(msg.rkey, msg.addr, msg.length)
            if got is not None:
                self._quick_reads += 1
                got.add_done_callback(lambda got: self._read_now_done(identity, env, deadline, got))
                return
        self._start(identity, env, deadline)

    def _start(self, identity: bytes, env: Envelope, deadline: float) -> None:
        """Serve ``env`` as a task of its own, done by ``deadline`` (loop time)."""
        task = asyncio.ensure_future(self._serve(identity, env, deadline))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _read_now_done(
        self,
        identity: bytes,
        env: Envelope,
        deadline: float,
        got: asyncio.Future[memoryview | None],
    ) -> None:
        """A READ without a task is done: answer it, or serve it as a task after all, by the
        deadline it had when it came (the session's deadline bounds the try without one)."""
        self._quick_reads -= 1
        msg = env.msg
        assert isinstance(msg, RdmaRead)
        data = None if got.cancelled() else got.result()
        if data is None:
            if self._closing:
                self.budget.unreserve(identity, msg.length)
            else:
                self._start(identity, env, deadline)
            return
        self.counters["reads"] += 1
        self._reply(identity, RdmaReadReply(length=msg.length), env.id, [data],
                    reserved=msg.length)  # fmt: skip

    async def _serve(self, identity: bytes, env: Envelope, deadline: float) -> None:
        """Perform one RDMA request and answer it, by ``deadline`` (loop time)."""
        msg = env.msg
        try:
            async with asyncio.timeout_at(deadline):
                if isinstance(msg, RdmaRead):
                    self.counters["reads"] += 1
                    await self._read(identity, env.id, msg)
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

    async def _read(self, identity: bytes, re: int, msg: RdmaRead) -> None:
        """An RDMA READ: the data goes out zero-copy, from hmmd's replies or from DMA window
        slots, which are given back once libzmq released the frame."""
        hold: list[Slot] = []
        try:
            pieces = await self.nic.read(msg.rkey, msg.addr, msg.length, hold=hold)
        except BaseException:
            self.budget.unreserve(identity, msg.length)
            for slot in hold:  # the earlier pieces were read whole: their slots are free
                slot.window.give_back(slot)
            raise
        data: Any = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if hold and len(pieces) != 1:
            for slot in hold:  # joined into a copy already
                slot.window.give_back(slot)
            hold = []
        reply = RdmaReadReply(length=msg.length)
        # A reply from the window holds no memory of ours but the window's, which bounds it:
        # it is not counted against the requester's cap (its tracker, set by pyzmq's gc
        # thread, may lag behind a busy loop). A requester that does not read fills the
        # window, and then the plain path's replies, which are counted, as before.
        tracker = self._reply(
            identity, reply, re, [data], reserved=msg.length, track=bool(hold), counted=not hold
        )
        if hold:
            assert tracker is not None  # track=True always gives one
            hold[0].window.lend(hold, tracker)

    def _refusal(self, requester: str | None, msg: RdmaRead | RdmaWrite | RdmaAtomic) -> str | None:
        """Why ``requester`` may not make this access (None: the grants allow it).

        An MR it holds no grant on reads exactly as an unknown rkey: the answer
        must not tell a stranger which keys exist.
        """
        mr = self.nic.find(msg.rkey)
        granted = AccessFlags(0) if mr is None else self.grants.rights(requester, mr.mrn)
        if mr is None or not granted:
            return f"no MR with key {msg.rkey:#x} on {self.nic.name}"
        needed = _NEEDS[type(msg)]
        if not granted & needed:
            return f"mr {mr.mrn}: {needed.name} was not granted to this requester"
        return None

    def _stat(self, requester: str) -> StatMrReply:
        """The ``stat_mr_reply`` for the MRs granted to ``requester``."""
        rows: list[int] = []
        mine = [r for r in self.nic.stat_mr() if self.grants.rights(requester, r["mrn"])]
        for row in mine[:4096]:
            rows.extend(row[name] for name in STAT_MR_COLUMNS)
        return StatMrReply(device=self.nic.name[:64], rows=tuple(rows))

    # --- outbound -------------------------------------------------------------------------------

    def _over_budget(self, identity: bytes, msg: Message, re: int) -> bool:
        """Refuse with EAGAIN (and say so) a request whose reply ``identity`` has no room for.

        A READ sets its length aside until its reply is sent; any other request is
        refused once the requester is at its cap.
        """
        budget = self.budget
        if isinstance(msg, RdmaRead):
            if budget.reserve(identity, msg.length):
                return False
        elif not budget.full(identity):
            return False
        text = (
            f"{budget.held(identity) >> 10} KiB of replies are queued for this requester "
            f"(cap {budget.cap >> 10} KiB); read them first"
        )
        self._reply(identity, Error(code=int(ErrorCode.EAGAIN), message=text), re)
        return True

    def _reply(
        self,
        identity: bytes,
        msg: Message,
        re: int,
        bulk: Sequence[Any] = (),
        reserved: int = 0,
        track: bool = False,
        counted: bool = True,
    ) -> zmq.MessageTracker | None:
        """Send ``msg`` to ``identity``; a requester that left is counted, not an error.

        Its bytes count against the requester's reply cap (in place of ``reserved``)
        until libzmq lets go of them: the last frame is then sent tracked, as it is
        with ``track``. Returns that frame's tracker (None if untracked): done once
        libzmq no longer reads the frame's memory, sent or dropped. A reply not
        ``counted`` only gives back its reservation.
        """
        frames = encode(msg, 0, re, bulk)
        nbytes = frame_bytes(frames)
        tracker = None
        if track or self.budget.wants_tracker(identity, nbytes):
            last = frames[-1] = zmq.Frame(frames[-1], track=True, copy=False)
            tracker = last.tracker
        try:
            self.server.send(identity, frames, copy=False)
        except Unreachable as exc:  # gone, or its queue is full
            self.counters["unroutable"] += 1
            self.budget.unreserve(identity, reserved)
            log.debug("reply to a requester dropped: %s", exc)
        else:
            if counted:
                self.budget.sent(identity, nbytes, tracker, reserved)
            else:
                self.budget.sent(identity, 0, None, reserved)
        return tracker
