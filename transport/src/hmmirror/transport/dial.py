"""The client end: a DEALER that a server (hmmd, hm-agent) connects to, after a knock.

The DEALER binds, and the client knocks at the server's door (``door``); the
server's ROUTER then connects to it (``server`` says why that way round):

- ``ipc://PATH``: the DEALER binds a socket file in a fresh private directory
  (mode 0700: nobody else can reach it by path), the knock hands the server an
  ``O_PATH`` descriptor of that file, and once the server is connected the file
  is removed, so no one can ever connect to the DEALER again.
- ``tcp://HOST:PORT``: the DEALER binds a free port on the address the knock
  leaves from, and the knock names that port. With CURVE keys the DEALER is the
  CURVE *client*: only the holder of the server's secret key can complete a
  handshake with it, whoever connects. Once the server is connected the port's
  listening socket drops every packet, so no one can connect to the DEALER again
  (``Dialer._shut_port``).

``Dialer`` does this for asyncio code (``await dialer.dial(timeout)``), or with
``dial_sync``; ``dial`` returns a ready socket for blocking code (tests,
benchmarks, tools).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import zmq
from hmmirror.transport.door import (
    DoorError,
    check_reply,
    knock,
    knock_async,
    read_reply,
    read_reply_async,
    split_tcp,
    tcp_endpoint,
    unreachable,
)
from hmmirror.transport.keys import CurveKeys
from hmmirror.transport.sockets import EVENTS, POLLOUT, tune
from hmmirror.transport.sockowner import (
    is_local,
    knocker_uid,
    listener_uids,
    peers_at,
    refuse_all,
)
from zmq.utils.monitor import recv_monitor_message

#: A busy door is knocked at again after this pause, doubling up to the maximum.
BUSY_PAUSE, BUSY_PAUSE_MAX = 0.01, 0.2
#: The monitor events of a handshake that failed (the DEALER is the CURVE client).
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def _private_dir() -> str:
    """A fresh mode-0700 directory for a DEALER's socket file (short: sun_path is 107 bytes)."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if not base or not os.access(base, os.W_OK | os.X_OK) or len(base) > 60:
        base = tempfile.gettempdir()
    return tempfile.mkdtemp(prefix="hmmirror-", dir=base)


class Dialer:
    """A DEALER socket towards ``endpoint``; ready once ``dial`` (or ``dial_sync``) returned."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        endpoint: str,
        curve: CurveKeys | None = None,
        options: Mapping[int, int] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.ipc = endpoint.startswith("ipc://")
        if self.ipc:
            if len(endpoint) == len("ipc://"):
                raise ValueError(f"{endpoint!r} names no socket path")
        else:
            if not endpoint.startswith("tcp://"):
                raise ValueError(f"{endpoint!r} is not ipc://PATH or tcp://HOST:PORT")
            self.host, self.port = split_tcp(endpoint)
        self.curve = curve
        self.sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
        tune(self.sock)
        for option, value in (options or {}).items():
            self.sock.setsockopt(option, value)
        self._dir = ""
        self._file = ""
        #: ``tcp://``: the address and port the DEALER bound for the knock, its listening
        #: socket's descriptor (libzmq's), and the door's address as the knock reached it.
        self._bound: tuple[str, int] | None = None
        self._listener = -1
        self._door_at: tuple[str, int] | None = None
        self.ready = False
        self._auth_failed = False
        #: The handshake monitor's PAIR socket while a CURVE dial runs: ``close`` closes it
        #: too, so a dial cancelled by a close cannot keep the context from terminating.
        self._watcher: zmq.Socket[Any] | None = None
        try:
            if self.ipc:
                self._dir = _private_dir()
                # Gone at the latest when the Dialer is, or the interpreter exits.
                self._removal = weakref.finalize(self, shutil.rmtree, self._dir, True)
                self._file = os.path.join(self._dir, "s")
                self.sock.bind(f"ipc://{self._file}")
                # Reachable by path only through the 0700 directory; the server gets to
                # it through the descriptor, whatever its own uid.
                os.chmod(self._file, 0o666)
            elif curve is not None:
                curve.apply(self.sock)
        except BaseException:
            self.close()
            raise

    # --- ipc ----------------------------------------------------------------------------------

    @property
    def door(self) -> str:
        """Where the server's door is: a path, or HOST:PORT."""
        return self.endpoint[len("ipc://") :] if self.ipc else f"{self.host}:{self.port}"

    def _descriptor(self) -> int:
        """An ``O_PATH`` descriptor of the DEALER's socket file."""
        return os.open(self._file, os.O_PATH | os.O_CLOEXEC)

    def _seal(self) -> None:
        """Remove the socket file and its directory: nobody else can connect from now on."""
        if self._dir:
            self._removal()
            self._dir = ""

    # --- tcp ----------------------------------------------------------------------------------

    def _knock_socket(self) -> socket.socket:
        """A TCP socket towards the server's door (not yet connected)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)

    def _bind_near(self, knocking: socket.socket) -> int:
        """Bind the DEALER on the address ``knocking`` leaves from; return its port.

        The listening socket is made here and handed to libzmq (``ZMQ_USE_FD``), which
        owns it from then on: its descriptor is what ``_shut_port`` filters. Once per
        Dialer: a knock again (a busy door, a dial tried anew) names the same port, so
        that no earlier listener stays open beside the one that is filtered."""
        if self._bound is not None:
            return self._bound[1]
        local = str(knocking.getsockname()[0])
        listener = socket.socket(knocking.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind((local, 0))
            listener.listen(8)
            port = int(listener.getsockname()[1])
            self.sock.setsockopt(zmq.USE_FD, listener.fileno())
            self.sock.bind(tcp_endpoint(local, port))
        except BaseException:
            listener.close()
            raise
        self._listener = listener.detach()  # libzmq closes it with the DEALER
        self._bound = (local, port)
        peer = knocking.getpeername()
        self._door_at = (str(peer[0]), int(peer[1]))
        return port

    def _shut_port(self) -> None:
        """``tcp://``: the server's connection arrived, so the DEALER's port takes no other,
        and the one it took must be the server's.

        Anyone who can reach the port could otherwise connect to it: in plain TCP to read
        the requests the DEALER spreads over its connections, and with CURVE by relaying a
        second connection of the server's (its own knock, naming its own port) into it,
        to drop them. The listening socket gets a filter that drops every packet
        (``sockowner.refuse_all``; the connection made stays). The dial fails, and the
        DEALER is closed, if any other connection got in, or if the one that did is not
        the server's: from a server on this host, a socket of the user its door belongs
        to; from another host, the address the knock went to.
        """
        if self._bound is None or self._listener < 0 or self._door_at is None:
            return
        host, port = self._bound
        try:
            refuse_all(self._listener)
            peers = peers_at(host, port)
        except OSError as exc:
            self.close()
            why = f"cannot close this client's port: {exc}"
            raise DoorError(errno.EIO, self.door, why) from exc
        why = ""
        if len(peers) != 1:
            why = f"{len(peers)} connections reached this client's port {port} during the dial"
        elif not self._from_server(peers[0], (host, port)):
            why = f"the connection that reached this client's port {port} is not the server's"
        if why:
            self.close()
            raise DoorError(errno.EPERM, self.door, f"{why}: another process is in the way")

    def _from_server(self, peer: tuple[str, int], mine: tuple[str, int]) -> bool:
        """Whether the connection from ``peer`` to ``mine`` was made by the server.

        On this host: a socket of the user the door belongs to. From another host, the
        one connection that came during the dial is taken: a multi-homed or NATed server's
        reply may come from another address than the one knocked at, and with CURVE the
        handshake, which only the server's secret key completes, says it is the server's
        (a relay of it could drop traffic but not read it, as anyone on the path can). In
        plain TCP nothing says who a remote server is: ``insecure`` means that."""
        assert self._door_at is not None
        door_host, door_port = self._door_at
        if not is_local((door_host, door_port)):
            return True
        owner = knocker_uid(peer, mine)  # the uid of the socket at the far end
        return owner is not None and owner in listener_uids(door_host, door_port)

    # --- both ---------------------------------------------------------------------------------

    def _connected(self) -> bool:
        """Whether the server's connection reached the DEALER (it can send)."""
        return bool(cast(int, self.sock.get(EVENTS)) & POLLOUT)

    def _refused(self, why: str) -> DoorError:
        """The error for a server that never connected (or whose handshake failed)."""
        if self._auth_failed:
            return DoorError(
                errno.EACCES,
                self.door,
                "the server refused this client's CURVE key: it is not in its allow-list "
                "(or the server's key is not the one this client expects)",
            )
        if self.curve is not None:
            hint = " (is this client's CURVE key in its allow-list?)"
        elif not self.ipc:
            hint = (
                " (a tcp:// server that requires CURVE ignores a client without keys: "
                "give this client the server's public key and a key pair of its own)"
            )
        else:
            hint = ""
        return DoorError(errno.ETIMEDOUT, self.door, f"{why}{hint}")

    @contextlib.contextmanager
    def _watching(self) -> Iterator[Callable[[], bool]]:
        """While dialing with CURVE: a test of whether the handshake was refused."""
        if self.curve is None:
            yield lambda: False
            return
        # An address of its own: pyzmq's default one stays taken after disable_monitor.
        address = f"inproc://hmmirror.dial.{id(self)}.{secrets.token_hex(4)}"
        self.sock.monitor(address, _HANDSHAKE_FAILED)
        monitor = self._watcher = self.sock.context.socket(zmq.PAIR)
        monitor.connect(address)

        def refused() -> bool:
            """Whether the monitor reported a failed handshake."""
            while monitor.poll(0):
                event = recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self._auth_failed = True
            return self._auth_failed

        try:
            yield refused
        finally:
            self._unwatch()

    def _unwatch(self) -> None:
        """Stop the handshake monitor of a CURVE dial, if one runs (idempotent)."""
        monitor, self._watcher = self._watcher, None
        if monitor is None:
            return
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        monitor.close(linger=0)

    async def dial(self, timeout: float) -> None:
        """Knock, then wait for the server's connection; raise DoorError. A failed dial
        that bound a port closes the Dialer (``closed``): the server may still connect to
        that port late, and a new Dialer knocks with a new one."""
        with self._closed_if_failed():
            await self._dial_async(timeout)

    async def _dial_async(self, timeout: float) -> None:
        if self.ready:
            return
        deadline = time.monotonic() + timeout
        with self._watching() as refused:
            pause = BUSY_PAUSE
            while True:
                try:
                    if self.ipc:
                        fd = self._descriptor()
                        try:
                            await knock_async(self.door, b"channel", fd, timeout)
                        finally:
                            os.close(fd)
                    else:
                        await self._knock_tcp_async(timeout)
                    break
                except DoorError as exc:
                    if not exc.busy or time.monotonic() + pause > deadline:
                        raise
                await asyncio.sleep(pause)  # the door is busy: knock again a little later
                pause = min(2 * pause, BUSY_PAUSE_MAX)
            while not self._connected():
                if time.monotonic() > deadline or refused():
                    raise self._refused("the server did not connect back")
                await asyncio.sleep(0.001)
        self._shut_port()
        self._seal()
        self.ready = True

    async def _knock_tcp_async(self, timeout: float) -> None:
        """``channel PORT`` at a TCP door, without blocking the loop."""
        loop = asyncio.get_running_loop()
        with self._knock_socket() as knocking:
            knocking.setblocking(False)
            try:
                async with asyncio.timeout(timeout):
                    await loop.sock_connect(knocking, (self.host, self.port))
                    port = self._bind_near(knocking)
                    await loop.sock_sendall(knocking, f"channel {port}\n".encode())
                    reply = await read_reply_async(knocking)
            except TimeoutError as exc:
                raise self._refused(f"no answer in {timeout:g} s") from exc
            except OSError as exc:
                raise unreachable(self.door, exc) from exc
        check_reply(self.door, reply)

    def dial_sync(self, timeout: float) -> None:
        """``dial`` for blocking code."""
        with self._closed_if_failed():
            self._dial_blocking(timeout)

    @contextlib.contextmanager
    def _closed_if_failed(self) -> Iterator[None]:
        """Close the Dialer if the dial fails once it has bound a port."""
        try:
            yield
        except BaseException:
            if self._bound is not None and not self.ready:
                self.close()
            raise

    def _dial_blocking(self, timeout: float) -> None:
        if self.ready:
            return
        deadline = time.monotonic() + timeout
        with self._watching() as refused:
            pause = BUSY_PAUSE
            while True:
                try:
                    if self.ipc:
                        fd = self._descriptor()
                        try:
                            knock(self.door, b"channel", fd, timeout)
                        finally:
                            os.close(fd)
                    else:
                        self._knock_tcp_sync(timeout)
                    break
                except DoorError as exc:
                    if not exc.busy or time.monotonic() + pause > deadline:
                        raise
                time.sleep(pause)  # the door is busy: knock again a little later
                pause = min(2 * pause, BUSY_PAUSE_MAX)
            while not self._connected():
                if time.monotonic() > deadline or refused():
                    raise self._refused("the server did not connect back")
                time.sleep(0.001)
        self._shut_port()
        self._seal()
        self.ready = True

    def _knock_tcp_sync(self, timeout: float) -> None:
        """``channel PORT`` at a TCP door, blocking."""
        with self._knock_socket() as knocking:
            knocking.settimeout(timeout)
            try:
                knocking.connect((self.host, self.port))
                port = self._bind_near(knocking)
                knocking.sendall(f"channel {port}\n".encode())
                reply = read_reply(knocking)
            except OSError as exc:
                raise unreachable(self.door, exc) from exc
        check_reply(self.door, reply)

    @property
    def closed(self) -> bool:
        """Whether the socket is closed (``close``, or a dial that found another process in
        the way): a new Dialer must knock again."""
        return bool(self.sock.closed)

    def close(self) -> None:
        """Close the socket (linger 0), and the monitor of a dial in progress, and remove
        what it left on disk: the context can then terminate at once."""
        self._listener = -1
        self._unwatch()
        with contextlib.suppress(zmq.ZMQError):
            self.sock.close(linger=0)
        self._seal()


def dial(
    ctx: zmq.Context[Any],
    endpoint: str,
    curve: CurveKeys | None = None,
    timeout: float = 5.0,
    options: Mapping[int, int] | None = None,
) -> zmq.Socket[Any]:
    """A DEALER connected to ``endpoint``, for blocking code (raises DoorError, OSError)."""
    dialer = Dialer(ctx, endpoint, curve, options)
    try:
        dialer.dial_sync(timeout)
    except BaseException:
        dialer.close()
        raise
    return dialer.sock
