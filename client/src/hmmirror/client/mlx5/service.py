"""The RDMA service: remote requesters READ, WRITE and run atomics on a Nic's MRs.

One ROUTER socket, drained with ``loop.add_reader`` until ``EVENTS`` has no
POLLIN. Each request runs as a task (it may fault) under a deadline, and is
answered with the data, ``ok``, ``atomic_reply`` or an ``error`` whose code
follows the verbs semantics (``ErrorCode.REMOTE_ACCESS``, EPERM, EFAULT, ...).
READ data goes back as the very buffers hmmd's replies arrived in, zero-copy.

Who asks is what the listener proved (``requester_of``): a ``tcp://`` listener
is a CURVE server whose ZAP handler admits only the keys in an allow-list
directory (``listen``), unless it was made plain TCP with ``insecure``; an
``ipc://`` listener knows its peers' uids. Every access is checked against the
``Grants`` first: an MR the requester holds no grant on is, to it, an unknown
rkey. ``stat_mr`` answers authenticated requesters only, about their MRs only.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.auth
from hmmirror.client.channel import Drained, send_frames, tune
from hmmirror.client.errors import AgentError, DeviceError, RemoteAccessError, RemoteError
from hmmirror.client.mlx5.grants import Grants
from hmmirror.client.mlx5.nic import Nic
from hmmirror.client.mlx5.verbs import AccessFlags
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
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

#: How long one request may take, faults and retries included, before it fails with EBUSY.
REQUEST_DEADLINE = 10.0
#: Requests in progress at once; more are refused with EBUSY (the RNR NAK of this model).
MAX_IN_FLIGHT = 1024
#: The ZAP domain of the RDMA listener (its handler answers no other).
ZAP_DOMAIN = "hm-agent"
_ERRNO_CODES = {int(c): c for c in ErrorCode if c < 100}
_NEEDS = {
    RdmaRead: AccessFlags.REMOTE_READ,
    RdmaWrite: AccessFlags.REMOTE_WRITE,
    RdmaAtomic: AccessFlags.REMOTE_ATOMIC,
}


class ListenError(Exception):
    """The RDMA endpoint cannot be served: a bad scheme, an address in use, unusable keys."""


class AllowList:
    """The ZAP allow-list: the public keys of the ``*.key`` certificates in a directory.

    Read again whenever a file in it changed, so an operator admits or removes a
    requester by adding or deleting its certificate, without a restart. Called on
    the authenticator's thread; it never raises (a raise would end that thread,
    and every later handshake would hang): a bad file is skipped and logged.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._stamp: object = "unread"  # None once the directory could not be read
        self._keys: frozenset[bytes] = frozenset()

    def _reload(self) -> None:
        """Reread the certificates if any file in the directory changed since the last look."""
        try:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(".key"))
            paths = [os.path.join(self.directory, n) for n in names]
            stamp = [(p, os.stat(p).st_mtime_ns) for p in paths]
        except OSError as exc:
            if self._stamp is not None:
                log.error(
                    "cannot read the allow-list %s: %s; refusing everyone", self.directory, exc
                )
            self._stamp, self._keys = None, frozenset()
            return
        if stamp == self._stamp:
            return
        keys = set()
        for path in paths:
            try:
                keys.add(zmq.auth.load_certificate(path)[0])
            except (OSError, ValueError) as exc:
                log.warning("allow-list: skipping %s: %s", path, exc)
        self._stamp, self._keys = stamp, frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        """Whether the Z85 public ``key`` may connect."""
        try:
            self._reload()
            allowed = domain == ZAP_DOMAIN and key in self._keys
        except Exception:  # never end the ZAP thread
            log.exception("allow-list check failed; refusing")
            return False
        if not allowed:
            log.warning("refused a CURVE requester whose key %s is not in %s",
                        key.decode(errors="replace"), self.directory)  # fmt: skip
        return allowed


def listen(
    ctx: zmq.Context[Any],
    endpoint: str,
    *,
    key_file: str = "",
    allow_dir: str = "",
    insecure: bool = False,
) -> tuple[zmq.Socket[Any], str, ThreadAuthenticator | None]:
    """The RDMA service's bound ROUTER, its bound endpoint, and its ZAP handler (or None).

    ``tcp://``: a CURVE server (``key_file``, its secret certificate) whose ZAP
    handler admits the ``*.key`` certificates in ``allow_dir``; or, only with
    ``insecure``, plain TCP. ``ipc://``: the kernel names each peer's uid; the
    socket file is mode 0666, since grants, not its mode, say who may do what,
    and a live agent's socket is never taken over. Raises ListenError, with
    everything made here closed again.
    """
    tcp, ipc = endpoint.startswith("tcp://"), endpoint.startswith("ipc://")
    if not (tcp or ipc):
        raise ListenError(f"cannot listen on {endpoint!r}: only tcp:// and ipc:// are served")
    if tcp and not key_file and not insecure:
        raise ListenError(f"{endpoint} is tcp://: set listen_key and listen_allow, or insecure")
    if ipc and _live_unix_socket(endpoint[len("ipc://") :]):
        raise ListenError(f"cannot listen on {endpoint}: another process serves it")
    auth: ThreadAuthenticator | None = None
    sock = ctx.socket(zmq.ROUTER)
    try:
        tune(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if tcp and key_file:
            public, secret = zmq.auth.load_certificate(key_file)
            if secret is None:
                raise ListenError(f"listen_key: {key_file} holds no secret key (.key_secret)")
            if not os.path.isdir(allow_dir):
                raise ListenError(f"listen_allow: {allow_dir!r} is not a directory")
            auth = ThreadAuthenticator(ctx, log=logging.getLogger("hmmirror.agent.zap"))
            auth.start()
            auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=AllowList(allow_dir))
            sock.curve_secretkey, sock.curve_publickey = secret, public
            sock.curve_server = True
            sock.zap_domain = ZAP_DOMAIN.encode()
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler: no handshake at all
        sock.bind(endpoint)
        bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if ipc:
            os.chmod(bound[len("ipc://") :], 0o666)
    except BaseException as exc:
        sock.close(linger=0)
        if auth is not None:
            auth.stop()
        if isinstance(exc, ListenError):
            raise
        if isinstance(exc, zmq.ZMQError | OSError | ValueError):
            raise ListenError(f"cannot listen on {endpoint}: {exc}") from exc
        raise
    return sock, bound, auth


def _live_unix_socket(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket at ``path``."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def requester_of(frame: zmq.Frame, ipc: bool, curve: bool) -> str | None:
    """Who sent ``frame``, as the listener proved it: ``curve:KEY``, ``uid:N`` or None.

    A CURVE listener's ZAP handler put the admitted key in ``User-Id``; on
    ``ipc://`` the ``Peer-Address`` is ``host:uid:gid:pid`` from SO_PEERCRED. A
    plain-TCP (``insecure``) peer is nobody: None. Nothing the peer *says* counts.
    """
    try:
        if curve:
            return f"curve:{frame.get('User-Id')}"
        if ipc:
            uid = str(frame.get("Peer-Address")).rsplit(":", 3)[1]
            return f"uid:{int(uid)}"
    except (zmq.ZMQError, IndexError, ValueError):
        pass
    return None


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
    """Serves ``nic``'s MRs on ``endpoint`` to the requesters ``grants`` name.

    ``tcp://host:port`` (port 0 picks one) needs ``key_file`` and ``allow_dir``,
    or ``insecure``; ``ipc://PATH`` needs neither. The constructor binds (or
    raises ListenError); ``start`` begins serving what queued meanwhile.
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
    ) -> None:
        self.nic = nic
        #: Replaced whole on a reload; a request is checked against the table of its arrival.
        self.grants = grants or Grants()
        # The session's context: one ZeroMQ I/O thread for both sockets, one less to wake.
        self.sock, self.endpoint, self._auth = listen(
            nic.session.ctx, endpoint, key_file=key_file, allow_dir=allow_dir, insecure=insecure
        )
        self._ipc = endpoint.startswith("ipc://")
        self._curve = self._auth is not None
        self._serving = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.counters = dict.fromkeys(
            ("requests", "reads", "writes", "atomics", "errors", "bad_messages", "unroutable",
             "refused"), 0,
        )  # fmt: skip

    def start(self) -> None:
        """Begin serving on the running loop (requests that arrived since the bind first)."""
        self._watch(self.sock)
        self._serving = True
        self.loop.call_soon(self._drain)  # the FD is edge-triggered: look once now

    async def close(self) -> None:
        """Stop serving: cancel requests in progress, close the socket, stop the ZAP handler."""
        if self._serving:
            self._unwatch()
            self._serving = False
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    # --- inbound --------------------------------------------------------------------------------

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        """A request: the peer's identity frame, then the message."""
        requester = requester_of(frames[-1], self._ipc, self._curve)
        self._handle(frames[0].bytes, frames[1:], requester)

    def _handle(self, identity: bytes, frames: Sequence[zmq.Frame], requester: str | None) -> None:
        """Decode one request, check it against the grants and start it; a malformed or
        refused one is answered and counted."""
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
            self._reply(identity, self._stat(requester), env.id)
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

    def _reply(self, identity: bytes, msg: Message, re: int, bulk: Sequence[Any] = ()) -> None:
        """Send ``msg`` to ``identity``; a requester that left is counted, not an error."""
        try:
            send_frames(self.sock, [identity, *encode(msg, 0, re, bulk)], copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (ROUTER_MANDATORY) or a full queue
            self.counters["unroutable"] += 1
            log.debug("reply to a requester dropped: %s", exc)
        self._sent()
