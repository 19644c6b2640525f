"""The server end of hmmirror's connections (hmmd, hm-agent): one ROUTER, peers it can name.

The ROUTER never binds. The public endpoint is a door (``door``); a client
binds its own DEALER, knocks, and the ROUTER *connects* to it under a routing
id this server draws (``ZMQ_CONNECT_ROUTING_ID``), with reconnection off. No
peer can present a routing id or reach a libzmq listener of the server, and
every connection is bound to what was proved about its peer:

- ``ipc://PATH``: the client hands over an ``O_PATH`` descriptor of its socket
  file, which must belong to its uid; the ROUTER connects through
  ``/proc/self/fd/N``. The peer is the knock's SO_PEERCRED (uid, gid, pid).
- ``tcp://HOST:PORT``: the client names the port it bound on the address it
  knocked from, and the ROUTER connects there as the CURVE *server*: the
  client's socket is a CURVE client that only completes the handshake with
  this server's key, and the ZAP handler (``zap``) only with allow-listed
  client keys. The peer is that key (read from the first message's
  ``User-Id``). With ``insecure``, plain TCP, and the peer is only an address.

Every message reaches ``on_message`` with the ``Connection`` it came on. Sends
never block: ROUTER_MANDATORY turns an unroutable peer into EHOSTUNREACH and a
full pipe into EAGAIN, both raised as ``Unreachable``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import zmq
from hmmirror.transport.door import Door, Handler, split_tcp, tcp_endpoint
from hmmirror.transport.keys import AllowDir, ServerKeys
from hmmirror.transport.peer import Peer
from hmmirror.transport.sockets import (
    NOBLOCK,
    SNDMORE,
    ZERO_COPY_MIN,
    Drained,
    Unreachable,
    tune,
    zmq_send,
)
from hmmirror.transport.zap import DOMAIN, ZapHandler

log = logging.getLogger(__name__)

#: How long a connection's handshake may take before libzmq gives it up.
HANDSHAKE_MS = 5000
#: Inbound messages queued per connection before libzmq stops reading its socket (the
#: kernel buffer then fills and the peer waits). The drain loop empties the queue at once, so
#: it fills only while the event loop is busy elsewhere: then 64 dma_writes of 4 MiB, 256 MiB,
#: is the most one connection holds. Lower costs latency: libzmq tells its I/O thread every
#: HWM/2 messages read that there is room again, and at 16 that wake cost the one-agent
#: invalidation round trip about 30 us on 2 vCPUs (1.36 of raw against 1.17 at 64).
INBOUND_HWM = 64


@dataclass
class Connection:
    """One connection this server made: its routing id, endpoint, and who is on the other end."""

    rid: bytes
    peer: Peer
    endpoint: str
    """What the ROUTER connected to (and disconnects from)."""
    opath: int = -1
    """``ipc://``: the client's socket file, held open so ``endpoint`` stays unique."""
    last_seen: float = field(default_factory=time.monotonic)
    proven: bool = False
    """Whether ``peer`` is final (a tcp CURVE peer's key is read from its first message)."""
    vouched: Any = None
    """What the server's ``vouch`` hook learnt of a local peer when it knocked."""


@dataclass(frozen=True)
class Limits:
    """How many connections a server keeps: per local uid or remote address, and in all."""

    per_peer: int = 32
    """Per local uid (root is not limited) or remote address."""
    total: int = 4096


class Server(Drained):
    """A ROUTER serving ``endpoint``; ``start()`` on the running loop, ``close()`` at the end."""

    def __init__(
        self,
        endpoint: str,
        on_message: Callable[[Connection, Sequence[zmq.Frame]], None],
        *,
        ctx: zmq.Context[Any] | None = None,
        keys: ServerKeys | None = None,
        allow: AllowDir | None = None,
        insecure: bool = False,
        group: str = "",
        mode: int = 0o660,
        limits: Limits | None = None,
        heartbeat_ms: int = 1000,
        door_handlers: Mapping[str, Handler] | None = None,
        vouch: Callable[[Peer, int], Any] | None = None,
    ) -> None:
        self.ipc = endpoint.startswith("ipc://")
        if self.ipc:
            self.path = endpoint[len("ipc://") :]
            if not self.path:
                raise ValueError(f"{endpoint!r} names no socket path")
        elif endpoint.startswith("tcp://"):
            self.host, self.port = split_tcp(endpoint)
            if keys is None and not insecure:
                raise ValueError(f"{endpoint}: a tcp:// endpoint needs CURVE keys or insecure")
            if keys is not None and allow is None:
                raise ValueError(f"{endpoint}: CURVE needs an allow-list directory")
        else:
            raise ValueError(f"{endpoint!r} is not ipc://PATH or tcp://HOST:PORT")
        self.endpoint = endpoint
        self.on_message = on_message
        self.limits = limits or Limits()
        self.group = group
        self.mode = mode
        self.door_handlers = dict(door_handlers or {})
        #: Called with a knocking local peer and its pidfd (or -1): what it returns is kept
        #: as the connection's ``vouched`` (hmmd reads the agent's credentials there).
        self.vouch = vouch
        self.connections: dict[bytes, Connection] = {}
        self._by_endpoint: dict[str, bytes] = {}
        self.door: Door | None = None
        self.zap: ZapHandler | None = None
        self.curve = keys is not None
        self._owns_ctx = ctx is None
        self.ctx = ctx if ctx is not None else zmq.Context()
        sock = self.sock = self.ctx.socket(zmq.ROUTER)
        try:
            tune(sock)
            sock.setsockopt(zmq.RCVHWM, INBOUND_HWM)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.RECONNECT_IVL, -1)  # a lost client knocks again itself
            sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
            # ZMTP heartbeats drop half-open TCP peers; app heartbeats carry the lease.
            sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * heartbeat_ms)
            if keys is not None and allow is not None:
                sock.setsockopt(zmq.ZAP_DOMAIN, DOMAIN)
                sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
                self.zap = ZapHandler(self.ctx, allow)
                keys.apply(sock)
        except BaseException:
            self._close_sockets()
            raise

    # --- lifecycle ----------------------------------------------------------------------------

    def open(self) -> None:
        """Open the door on the running loop (raises AddressInUse, OSError); idempotent."""
        if self.door is not None:
            return
        if self.ipc:
            handlers = {"channel": self._channel_ipc, **self.door_handlers}
            self.door = Door.unix(self.path, handlers, self.group, self.mode)
        else:
            self.door = Door.tcp(self.host, self.port, {"channel": self._channel_tcp})
            self.endpoint = tcp_endpoint(self.host, self.door.port)

    def start(self) -> None:
        """Open the door (if ``open`` was not called) and begin draining, on the running loop."""
        self.open()
        self._watch(self.sock)

    def close(self) -> None:
        """Close the door, every connection and the socket (linger 0)."""
        if self.door is not None:
            self.door.close()
            self.door = None
        with contextlib.suppress(AttributeError, RuntimeError, ValueError):
            self._unwatch()
        for conn in list(self.connections.values()):
            if conn.opath >= 0:
                with contextlib.suppress(OSError):
                    os.close(conn.opath)
        self.connections.clear()
        self._by_endpoint.clear()
        self._close_sockets()

    def _close_sockets(self) -> None:
        """Close the ROUTER, the ZAP handler and (if ours) the context."""
        self.sock.close(linger=0)
        if self.zap is not None:
            self.zap.close()
        if self._owns_ctx:
            self.ctx.term()

    # --- connections --------------------------------------------------------------------------

    def _channel_ipc(self, peer: Peer, arg: str, fd: int, pidfd: int) -> str | None:
        """``channel`` on the Unix door: connect to the caller's socket file ``fd``."""
        try:
            st = os.fstat(fd)
        except OSError as exc:
            return f"cannot inspect the descriptor: {exc.strerror}"
        if not stat.S_ISSOCK(st.st_mode):
            return "the descriptor is not a socket file (send an O_PATH descriptor of it)"
        if not peer.root and st.st_uid != peer.uid:
            return f"the socket file belongs to uid {st.st_uid}, not to uid {peer.uid}"
        why = self._connect(peer, f"ipc:///proc/self/fd/{fd}", fd, proven=True)
        if why is None and self.vouch is not None:
            self.connections[self._by_endpoint[f"ipc:///proc/self/fd/{fd}"]].vouched = self.vouch(
                peer, pidfd
            )
        return why

    def _channel_tcp(self, peer: Peer, arg: str, fd: int, pidfd: int) -> str | None:
        """``channel PORT`` on the TCP door: connect to that port at the caller's address."""
        if not arg.isdigit() or not 0 < int(arg) < 65536:
            return f"'channel' needs the port the client bound, got {arg!r}"
        assert peer.address is not None
        endpoint = tcp_endpoint(peer.address, int(arg))
        old = self._by_endpoint.get(endpoint)
        if old is not None:
            self.drop(old)  # the client's port was reused: that connection is gone
        return self._connect(peer, endpoint, -1, proven=not self.curve)

    def _connect(self, peer: Peer, endpoint: str, opath: int, proven: bool) -> str | None:
        """Connect the ROUTER to ``endpoint`` under a fresh routing id; the refusal, or None."""
        why = self._over_limit(peer)
        if why is not None:
            return why
        rid = b"\x01" + secrets.token_bytes(15)
        try:
            self.sock.setsockopt(zmq.CONNECT_ROUTING_ID, rid)
            self.sock.connect(endpoint)
        except zmq.ZMQError as exc:
            return f"cannot connect to {endpoint}: {exc}"
        self.connections[rid] = Connection(rid, peer, endpoint, opath, proven=proven)
        self._by_endpoint[endpoint] = rid
        return None

    def _over_limit(self, peer: Peer) -> str | None:
        """Why one more connection of ``peer`` is refused, or None."""
        if len(self.connections) >= self.limits.total:
            return f"too many connections ({self.limits.total}); try again later"
        if peer.root:
            return None
        if peer.uid is not None:
            mine = sum(1 for c in self.connections.values() if c.peer.uid == peer.uid)
            who = f"uid {peer.uid}"
        else:
            mine = sum(1 for c in self.connections.values() if c.peer.address == peer.address)
            who = f"address {peer.address}"
        if mine >= self.limits.per_peer:
            return f"{who} has {mine} connections, the most one may have"
        return None

    def drop(self, rid: bytes) -> None:
        """Disconnect and forget a connection."""
        conn = self.connections.pop(rid, None)
        if conn is None:
            return
        if self._by_endpoint.get(conn.endpoint) == rid:
            del self._by_endpoint[conn.endpoint]
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disconnect(conn.endpoint)
        if conn.opath >= 0:
            with contextlib.suppress(OSError):
                os.close(conn.opath)

    def idle(self, since: float) -> list[Connection]:
        """Connections that sent nothing after ``since`` (monotonic)."""
        return [c for c in self.connections.values() if c.last_seen < since]

    # --- inbound ------------------------------------------------------------------------------

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        """One inbound message: find its connection, then hand it on."""
        if len(frames) < 2:
            return
        conn = self.connections.get(frames[0].bytes)
        if conn is None:
            return  # a connection dropped a moment ago: nobody to answer
        conn.last_seen = time.monotonic()
        if not conn.proven:
            # The CURVE key the ZAP handler admitted, once per connection.
            with contextlib.suppress(zmq.ZMQError, UnicodeDecodeError):
                key = frames[1].get("User-Id")
                conn.peer = replace(conn.peer, curve_key=str(key) if key else None)
            conn.proven = True
        try:
            self.on_message(conn, frames[1:])
        except Exception:  # a handler bug must never take the loop down
            log.exception("unhandled error while handling a message from %r", frames[0].bytes)

    # --- outbound -----------------------------------------------------------------------------

    def send(self, rid: bytes, frames: Sequence[Any], *, copy: bool = True) -> None:
        """Queue ``frames`` to ``rid`` without blocking; raise ``Unreachable`` on failure."""
        try:
            sock = self.sock
            # A ROUTER queues nothing until the last frame, so a failure leaves no partial message.
            zmq_send(sock, rid, NOBLOCK | SNDMORE)
            for frame in frames[:-1]:
                # Small frames are cheaper copied than referenced: zero-copy is for bulk data.
                zmq_send(sock, frame, NOBLOCK | SNDMORE, copy or len(frame) < ZERO_COPY_MIN)
            last = frames[-1]
            zmq_send(sock, last, NOBLOCK, copy or len(last) < ZERO_COPY_MIN)
        except zmq.Again as exc:
            raise Unreachable(f"peer {rid.hex()}: send queue full") from exc
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise Unreachable(f"peer {rid.hex()} is not connected") from exc
            raise
        finally:
            self._sent()
