"""hmmd's ZeroMQ ROUTER, driven by a drain loop on the event loop.

A plain (not ``zmq.asyncio``) socket is registered with ``loop.add_reader`` on
its edge-triggered FD; the reader drains until ``EVENTS`` shows no POLLIN, and
every send re-checks ``EVENTS`` because a send can consume the edge
(pyzmq #1177). This is the measured-fastest pattern on these machines
(reference/zeromq-python.md §2, §7). Sends never block: ROUTER_MANDATORY
turns an unroutable peer into EHOSTUNREACH and a full pipe into EAGAIN, both
reported to the caller as ``Unreachable``.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import stat
from collections.abc import Callable, Sequence
from typing import Any, cast

import zmq
import zmq.auth
import zmq.backend
from hmmirror.proto.codec import Buffer
from hmmirror.proto.messages import MAX_FRAME
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

# pyzmq's constants are IntFlag enums, and enum arithmetic costs microseconds per
# call on the hot path; plain ints cost nothing.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
#: The Cython send itself: pyzmq's Python wrapper around it only handles DRAFT routing
#: ids and groups, which hmmirror never uses, and costs a quarter of a small send.
_zmq_send = zmq.backend.Socket.send
#: Frames this large go out zero-copy when the caller allows it (pyzmq's break-even).
ZERO_COPY_MIN = 64 * 1024
#: Kernel socket buffers asked for (the kernel caps them at net.core.[rw]mem_max): fewer,
#: larger writes for megabyte DMA replies.
SOCKET_BUFFER = 4 << 20


def share_with_group(path: str, group: str) -> None:
    """Make a socket file mode 0660 and, if ``group`` exists, owned by that group.

    Agents and targets in the group may then connect; nobody else may. A socket already in
    the group (hmmd.service runs with Group=hmmirror) is left alone: the unit's system call
    filter refuses chown, which @privileged holds.
    """
    os.chmod(path, 0o660)
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        log.info("no group %r: %s keeps its group", group, path)
        return
    if os.stat(path).st_gid != gid:
        os.chown(path, -1, gid)


class AllowDir:
    """The ZAP allow-list: the public keys of the ``*.key`` certificates in a directory.

    The directory is read again whenever it changed, so an operator admits or
    removes an agent by adding or deleting its certificate, without a restart.
    Called on the authenticator's thread.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._stamp: tuple[int, int] | None = None
        self._keys: frozenset[bytes] = frozenset()

    def _reload(self) -> None:
        """Reread the certificates if the directory changed since the last look."""
        try:
            st = os.stat(self.directory)
        except OSError:
            self._keys = frozenset()
            return
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            self._stamp = stamp
            self._keys = frozenset(zmq.auth.load_certificates(self.directory).keys())

    def callback(self, domain: str, key: bytes) -> bool:
        """Whether the Z85 public ``key`` may connect."""
        self._reload()
        allowed = key in self._keys
        if not allowed:
            log.warning("refused a CURVE client whose key %s is not in %s",
                        key.decode(errors="replace"), self.directory)  # fmt: skip
        return allowed


def peer_of(frame: Any) -> tuple[str | None, str | None]:
    """ZeroMQ's metadata about a message's sender: (Peer-Address, User-Id).

    On ``ipc://`` the address carries SO_PEERCRED as ``host:uid:gid:pid``; on a
    CURVE socket the User-Id is the public key the ZAP handler admitted.
    """
    found: list[str | None] = []
    for key in ("Peer-Address", "User-Id"):
        try:
            found.append(frame.get(key))
        except (zmq.ZMQError, AttributeError):
            found.append(None)
    return found[0], found[1]


class Unreachable(Exception):
    """A message could not be queued to a peer (gone, or its pipe is full)."""


class Transport:
    """The bound ROUTER socket. ``on_message(identity, frames)`` gets every inbound message."""

    def __init__(
        self,
        endpoint: str,
        on_message: Callable[[bytes, Sequence[Buffer]], None],
        *,
        hwm: int = 10000,
        heartbeat_ms: int = 1000,
        group: str = "hmmirror",
        curve_key: str = "",
        curve_allow: str = "",
    ) -> None:
        self.ctx = zmq.Context()
        self.auth: ThreadAuthenticator | None = None
        self.sock = self.ctx.socket(zmq.ROUTER)
        sock = self.sock
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        sock.setsockopt(zmq.SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(zmq.RCVBUF, SOCKET_BUFFER)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        # ZMTP heartbeats drop half-open TCP peers; app heartbeats carry the lease.
        sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * heartbeat_ms)
        if curve_key:
            self._curve(curve_key, curve_allow)
        self.on_message = on_message
        self.group = group
        self.endpoint = self._bind(endpoint)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._recheck = False
        self._draining = False
        self._fd = cast(int, sock.getsockopt(zmq.FD))

    def _curve(self, key_file: str, allow_dir: str) -> None:
        """Be a CURVE server whose ZAP handler admits only the public keys in ``allow_dir``.

        Clients with no key, or a key not in the directory, fail the handshake:
        they never reach hmmd's handlers at all.
        """
        public, secret = zmq.auth.load_certificate(key_file)
        if secret is None:
            raise OSError(f"{key_file} holds no secret key (use the .key_secret file)")
        self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("hmmirror.daemon.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(domain="*", credentials_provider=AllowDir(allow_dir))
        self.sock.curve_secretkey = secret
        self.sock.curve_publickey = public
        self.sock.curve_server = True

    def _bind(self, endpoint: str) -> str:
        """Bind the ROUTER, replacing a stale ipc socket file; return the bound endpoint."""
        if endpoint.startswith("ipc://"):
            path = endpoint[len("ipc://") :]
            directory = os.path.dirname(path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)  # a stale socket from a daemon that died
        try:
            self.sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(exc.errno, f"cannot bind {endpoint}: {exc}") from exc
        bound = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if endpoint.startswith("ipc://"):
            share_with_group(endpoint[len("ipc://") :], self.group)
        return bound

    def start(self) -> None:
        """Begin draining on the running loop."""
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self._fd, self.drain)
        self.loop.call_soon(self.drain)  # messages may have queued before the reader existed

    def drain(self) -> None:
        """Receive every queued message (the FD is edge-triggered: drain fully)."""
        # EVENTS is read again after every message, which also catches an edge that
        # a reply sent while handling it may have consumed.
        self._draining = True
        try:
            self._drain_all()
        finally:
            self._draining = False

    def _drain_all(self) -> None:
        """Receive and dispatch whole messages while EVENTS shows POLLIN."""
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
            if len(frames) < 2:
                continue
            try:
                self.on_message(frames[0].bytes, frames[1:])
            except Exception:  # a handler bug must never take the loop down
                log.exception("unhandled error while handling a message from %r", frames[0])

    def send(self, identity: bytes, frames: Sequence[Any], *, copy: bool = True) -> None:
        """Queue ``frames`` to ``identity`` without blocking; raise ``Unreachable`` on failure."""
        try:
            sock = self.sock
            # A ROUTER queues nothing until the last frame, so a failure leaves no partial message.
            _zmq_send(sock, identity, _NOBLOCK | _SNDMORE)
            for frame in frames[:-1]:
                # Small frames are cheaper copied than referenced: zero-copy is for bulk data.
                _zmq_send(sock, frame, _NOBLOCK | _SNDMORE, copy or len(frame) < ZERO_COPY_MIN)
            last = frames[-1]
            _zmq_send(sock, last, _NOBLOCK, copy or len(last) < ZERO_COPY_MIN)
        except zmq.Again as exc:
            raise Unreachable(f"peer {identity!r}: send queue full") from exc
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise Unreachable(f"peer {identity!r} is not connected") from exc
            raise
        finally:
            # A send can consume the FD's edge: look again, inside the drain loop if we
            # are in it, else once this tick is done (never once per send).
            if not self._draining and self.loop is not None and not self._recheck:
                self._recheck = True
                self.loop.call_soon(self._after_sends)

    def _after_sends(self) -> None:
        """Drain if this tick's sends consumed the FD's POLLIN edge."""
        self._recheck = False
        if cast(int, self.sock.get(_EVENTS)) & _POLLIN:
            self.drain()

    def close(self) -> None:
        """Stop draining and close the socket and context (linger 0)."""
        if self.loop is not None:
            self.loop.remove_reader(self._fd)
            self.loop = None
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
