"""The server end of hmmirror's connections (hmmd, hm-agent): one socket per peer it can name.

The server never binds a libzmq socket. The public endpoint is a door
(``door``); a client binds its own DEALER, knocks, and the server *connects* a
DEALER of its own to it, with reconnection off, under a connection id it draws
itself. No peer can present an id or reach a libzmq listener of the server,
and every connection is bound to what was proved about its peer:

- ``ipc://PATH``: the client hands over an ``O_PATH`` descriptor of its socket
  file, which must belong to its uid; the server connects through
  ``/proc/self/fd/N``. The peer is the knock's SO_PEERCRED (uid, gid, pid).
- ``tcp://HOST:PORT``: the client names the port it bound on the address it
  knocked from, and the server connects there as the CURVE *server*: the
  client's socket is a CURVE client that only completes the handshake with
  this server's key, and the ZAP handler (``zap``) only with allow-listed
  client keys. The peer is that key (read from the first message's
  ``User-Id``). With ``insecure``, plain TCP, and the peer is only an address.

Why a socket per connection and not one ROUTER for all: libzmq's fair queue
(``fq_t``, behind ROUTER and DEALER alike) loses its place when one of its
pipes finishes terminating while it is between two frames of another pipe's
message: the rest of that message is then read from a third peer's pipe
(frames spliced across peers) or libzmq aborts (``Assertion failed: !_more
(src/fq.cpp:80)``). A peer that closes its connection while others send
multi-frame messages triggers it (``tests/security/test_frame_splice.py``).
With one pipe per socket, no other peer's frames can be read in its place.

Why reconnection is "never" and not off: with ``RECONNECT_IVL`` -1, libzmq
ends the endpoint itself when the peer's connection drops, and the socket's
pipe stops reading at once, even between two frames of a message still
queued in it. The next ``recv`` then aborts on the same assertion (libzmq
4.3.5 reads its commands every 100th ``recv``, so a peer that queues
multi-frame messages and closes lands there in a few tries). With an
interval no connection outlives, the pipe lives until the server closes the
socket, between two messages; a peer that is gone is found by its silence
(the idle sweep) and by its missed deadlines, not by libzmq.

Why no ZMTP heartbeats: when a peer floods past the inbound HWM and then
closes, libzmq 4.3.5 marks the stopped connection as failed and leaves its
heartbeat timer armed; the timer's next send then aborts (``Assertion failed:
!_io_error (src/stream_engine_base.cpp:310)``). Half-open TCP peers are
dropped by the kernel's TCP keepalive instead. Both aborts are reproduced, one
connection socket at a time, by ``tests/security/closing_peer.py``.

Every message reaches ``on_message`` with the ``Connection`` it came on. Sends
never block: a full (or closed) pipe is EAGAIN, raised as ``Unreachable``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import secrets
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import zmq
from hmmirror.transport.door import Door, Handler, split_tcp, tcp_endpoint
from hmmirror.transport.errors import Unreachable, reason, unreachable
from hmmirror.transport.keys import AllowDir, ServerKeys
from hmmirror.transport.peer import Peer
from hmmirror.transport.sockets import Drained, context, send_frames, tune
from hmmirror.transport.sockowner import listener_uids
from hmmirror.transport.zap import DOMAIN, ZapHandler

log = logging.getLogger(__name__)

#: How long a connection's handshake may take before libzmq gives it up.
HANDSHAKE_MS = 5000
#: libzmq's reconnect interval for a connection's socket: never in practice (24.8 days, the
#: largest it takes), but not -1, which aborts on a half-read message (see above).
RECONNECT_NEVER_MS = 2**31 - 1
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
    heard: bool = False
    """Whether a message came on it (until then ``last_seen`` is when it was made)."""
    proven: bool = False
    """Whether ``peer`` is final (a tcp CURVE peer's key is read from its first message)."""
    vouched: Any = None
    """What the server's ``vouch`` hook learnt of a local peer when it knocked."""
    line: _Line | None = field(default=None, repr=False)
    """The connection's own socket, drained on the loop."""


class _Line(Drained):
    """One connection's DEALER, drained on the loop into the server."""

    def __init__(self, server: Server, conn: Connection, sock: zmq.Socket[Any]) -> None:
        self.server = server
        self.conn = conn
        self._watch(sock)

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        self.server._on_frames_of(self.conn, frames)

    def close(self, linger_ms: int = 0) -> None:
        """Stop draining and close the socket (what it still queues goes after ``linger_ms``)."""
        with contextlib.suppress(AttributeError, RuntimeError, ValueError):
            self._unwatch()
        self.sock.close(linger=linger_ms)


@dataclass(frozen=True)
class Limits:
    """How many connections a server keeps: per local uid or remote address, and in all."""

    per_peer: int = 32
    """Per local uid (root is not limited) or remote address."""
    total: int = 4096
    recycle_after: float = 60.0
    """A peer at ``per_peer`` that knocks again gets the place of its own connection heard
    from least recently, once that one has been silent this long (seconds): a client that
    died, or closed without saying so, cannot lock its uid or address out for good. A
    request in progress has a shorter deadline; a live client whose connection went this
    way has its next send refused at once and knocks again."""
    first_message_within: float = 3.0
    """A connection that has sent nothing this long after it was made gives its place to a
    knock that needs one (seconds): the knock named a port nobody answers from, or the
    handshake failed, or the client has nothing to say. Every hmmirror client sends at once
    (``hello``, a request; a connection's handshake takes a few round trips), so knocks
    that lead nowhere hold places only briefly: a flood of them must be fast, and is
    capped per user (on this host) or address besides."""
    first_message_within_remote: float = 10.0
    """The same for a connection to another host, whose handshake may cross a slow link."""


#: Sockets a context keeps beyond the connections: the clients', the ZAP handler's.
SPARE_SOCKETS = 16
#: Descriptors one connection holds at most: its socket's stream and mailbox, and, over
#: ``ipc://``, the client's socket file.
FDS_PER_CONNECTION = 3
#: Descriptors kept for everything else a server's process opens (its door, the knocks it is
#: reading, its own clients, files).
FD_RESERVE = 256


def fd_room() -> int:
    """Connections the soft RLIMIT_NOFILE leaves room for: more would meet EMFILE, and a
    full descriptor table fails every knock, not only the one too many."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, (soft - FD_RESERVE) // FDS_PER_CONNECTION)


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (a service's own choice, as
    ``LimitNOFILE=`` is the unit's); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, hard, exc)
    return soft


class Server:
    """Serves ``endpoint``, a socket per connection; ``start()`` on the running loop,
    ``close()`` at the end."""

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
        #: Sockets of connections made before ``start`` (a door opened early).
        self._pending: dict[bytes, zmq.Socket[Any]] = {}
        self.door: Door | None = None
        self.zap: ZapHandler | None = None
        self.keys = keys
        self.curve = keys is not None
        self.heartbeat_ms = heartbeat_ms
        self._started = False
        self._owns_ctx = ctx is None
        if ctx is None:
            ctx = context()
            # Before the first socket: the context's socket table is sized then.
            ctx.set(zmq.MAX_SOCKETS, self.limits.total + SPARE_SOCKETS)
        self.ctx = ctx
        room = min(int(ctx.get(zmq.MAX_SOCKETS)) - SPARE_SOCKETS, fd_room())
        if room < self.limits.total:
            self.limits = replace(self.limits, total=max(1, room))
        try:
            if keys is not None and allow is not None:
                self.zap = ZapHandler(self.ctx, allow)
        except BaseException:
            self._close_context()
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
        """Open the door (if ``open`` was not called) and begin serving, on the running loop."""
        self.open()
        self._started = True
        for conn in self.connections.values():
            if conn.line is None:
                self._attach(conn)

    def close(self) -> None:
        """Close the door and every connection (linger 0)."""
        if self.door is not None:
            self.door.close()
            self.door = None
        for rid in list(self.connections):
            self.drop(rid)
        self._close_context()

    def _close_context(self) -> None:
        """Close the ZAP handler and (if ours) the context."""
        if self.zap is not None:
            self.zap.close()
            self.zap = None
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
        if peer.host_uid not in (None, 0) and peer.host_uid not in listener_uids(
            peer.address, int(arg)
        ):
            # A local user names only a port it listens on itself: not another user's
            # client (whose connection it would hijack), nor a port nobody answers from.
            return f"uid {peer.host_uid} does not listen on port {arg} of {peer.address}"
        old = self._by_endpoint.get(endpoint)
        if old is not None:
            # Anyone at the address can name the port (`ss -tn` shows it), and nobody is
            # authenticated yet: a connection heard from lately is live, and a knock does not
            # take it away. One silent for ``recycle_after`` may belong to a client that died
            # and whose port was bound again: it gives way, as at the per-peer cap.
            silent = time.monotonic() - self.connections[old].last_seen
            if silent < self.limits.recycle_after:
                return f"port {arg} of {peer.address} is connected already; bind another"
            self.drop(old)
        return self._connect(peer, endpoint, -1, proven=not self.curve)

    def _connect(self, peer: Peer, endpoint: str, opath: int, proven: bool) -> str | None:
        """Connect a socket of its own to ``endpoint`` under a fresh id; the refusal, or None."""
        why = self._over_limit(peer)
        if why is not None:
            return why
        rid = b"\x01" + secrets.token_bytes(15)
        try:
            sock = self._socket()
        except zmq.ZMQError as exc:
            return f"cannot open a socket for {endpoint}: {reason(exc)}; try again later"
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            return f"cannot connect to {endpoint}: {reason(exc)}"
        conn = Connection(rid, peer, endpoint, opath, proven=proven)
        self.connections[rid] = conn
        self._by_endpoint[endpoint] = rid
        if self._started:
            self._attach(conn, sock)
        else:  # served from ``start``: messages wait in the socket until then
            self._pending[rid] = sock
        return None

    def _socket(self) -> zmq.Socket[Any]:
        """A DEALER with the options every connection has."""
        sock = self.ctx.socket(zmq.DEALER)
        try:
            tune(sock)
            sock.setsockopt(zmq.RCVHWM, INBOUND_HWM)
            # A lost client knocks again itself; the server only ever closes the socket.
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_NEVER_MS)
            sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
            # The kernel's TCP keepalive drops half-open TCP peers; app heartbeats carry the
            # lease. Not ZMTP heartbeats: their timer aborts libzmq 4.3.5 (see above).
            if not self.ipc:
                every_s = max(1, -(-self.heartbeat_ms // 1000))
                sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
                sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, every_s)
                sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, every_s)
                sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
            if self.keys is not None and self.zap is not None:
                sock.setsockopt(zmq.ZAP_DOMAIN, DOMAIN)
                sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
                self.keys.apply(sock)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def _attach(self, conn: Connection, sock: zmq.Socket[Any] | None = None) -> None:
        """Start draining ``conn``'s socket on the running loop."""
        if sock is None:
            sock = self._pending.pop(conn.rid)
        conn.line = _Line(self, conn, sock)

    def _over_limit(self, peer: Peer) -> str | None:
        """Why one more connection of ``peer`` is refused, or None. A place is made, when one
        is needed, from connections that never sent a message (``_drop_unheard``), then
        from ``peer``'s own silent ones (``_recycle``)."""
        every = list(self.connections.values())
        if len(every) >= self.limits.total and not self._drop_unheard(every):
            return f"too many connections ({self.limits.total}); try again later"
        if peer.root:
            return None
        if peer.uid is not None:
            theirs = [c for c in self.connections.values() if c.peer.uid == peer.uid]
            who = f"uid {peer.uid}"
        elif peer.host_uid is not None:  # a tcp:// knock from this host: its user's places
            theirs = [c for c in self.connections.values() if c.peer.host_uid == peer.host_uid]
            who = f"uid {peer.host_uid} (on this host)"
        else:
            theirs = [c for c in self.connections.values() if c.peer.address == peer.address]
            who = f"address {peer.address}"
        if (
            len(theirs) >= self.limits.per_peer
            and not self._drop_unheard(theirs)
            and not self._recycle(theirs, who)
        ):
            return f"{who} has {len(theirs)} connections, the most one may have"
        return None

    def _drop_unheard(self, among: list[Connection]) -> bool:
        """Drop the connections of ``among`` that sent nothing within
        ``first_message_within`` of being made (``first_message_within_remote`` for one to
        another host); whether any was. Knocks that lead nowhere
        do not hold places, whoever made them, whatever their address. A connection made
        before ``start`` is spared: nothing has been read from it yet."""
        now = time.monotonic()
        local, remote = self.limits.first_message_within, self.limits.first_message_within_remote
        stale = [
            c.rid
            for c in among
            if c.line is not None
            and not c.heard
            and now - c.last_seen
            >= (local if c.peer.local or c.peer.host_uid is not None else remote)
        ]
        if stale:
            log.info("%d connections that never sent a message dropped", len(stale))
        for rid in stale:
            self.drop(rid)
        return bool(stale)

    def _recycle(self, theirs: list[Connection], who: str) -> bool:
        """Drop the connection of ``theirs`` heard from least recently if it has been silent
        for ``recycle_after``; whether one was dropped."""
        oldest = min(theirs, key=lambda c: c.last_seen)
        silent = time.monotonic() - oldest.last_seen
        if silent < self.limits.recycle_after:
            return False
        log.info(
            "connection %s of %s silent for %.0f s: dropped for a new one of the same peer",
            oldest.rid.hex(),
            who,
            silent,
        )
        self.drop(oldest.rid)
        return True

    def drop(self, rid: bytes, linger_ms: int = 0) -> None:
        """Disconnect and forget a connection; ``linger_ms`` gives the messages already
        queued to it that long to leave (libzmq closes in the background)."""
        conn = self.connections.pop(rid, None)
        if conn is None:
            return
        if self._by_endpoint.get(conn.endpoint) == rid:
            del self._by_endpoint[conn.endpoint]
        if conn.line is not None:
            conn.line.close(linger_ms)
            conn.line = None
        pending = self._pending.pop(rid, None)
        if pending is not None:
            pending.close(linger=0)
        if conn.opath >= 0:
            with contextlib.suppress(OSError):
                os.close(conn.opath)

    def idle(self, since: float) -> list[Connection]:
        """Connections that sent nothing after ``since`` (monotonic)."""
        return [c for c in self.connections.values() if c.last_seen < since]

    # --- inbound ------------------------------------------------------------------------------

    def _on_frames_of(self, conn: Connection, frames: list[zmq.Frame]) -> None:
        """One inbound message on ``conn``: hand it on."""
        if conn.line is None:
            return  # dropped while its last messages were being drained: nobody to answer
        conn.last_seen = time.monotonic()
        conn.heard = True
        if not conn.proven:
            # The CURVE key the ZAP handler admitted, once per connection.
            with contextlib.suppress(zmq.ZMQError, UnicodeDecodeError):
                key = frames[0].get("User-Id")
                conn.peer = replace(conn.peer, curve_key=str(key) if key else None)
            conn.proven = True
        try:
            self.on_message(conn, frames)
        except Exception:  # a handler bug must never take the loop down
            log.exception("unhandled error while handling a message from %s", conn.rid.hex())

    # --- outbound -----------------------------------------------------------------------------

    def send(self, rid: bytes, frames: Sequence[Any], *, copy: bool = True) -> None:
        """Queue ``frames`` to ``rid`` without blocking; raise ``Unreachable`` on failure."""
        conn = self.connections.get(rid)
        line = conn.line if conn is not None else None
        if line is None:
            raise Unreachable(f"peer {rid.hex()} is not connected")
        try:
            # Small frames are cheaper copied than referenced: zero-copy is for bulk data. A
            # DEALER's pipe takes a whole message or, full or closed, nothing (EAGAIN).
            send_frames(line.sock, frames, copy)
        except zmq.Again as exc:
            raise unreachable(exc, f"peer {rid.hex()}") from exc
        finally:
            line._sent()
