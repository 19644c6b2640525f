"""The side door: a Unix socket where local processes hand a server a descriptor.

ZeroMQ sockets cannot carry descriptors, and a libzmq ``ipc://`` listener lets
any peer choose its routing id and aborts the process when it runs out of
descriptors (``ipc_listener.cpp`` asserts on EMFILE). So an ``ipc://`` endpoint
of hmmirror is this socket instead, owned by Python: each connection sends one
line and exactly one descriptor (SCM_RIGHTS), gets ``ok`` or ``error <why>``
back, and is closed. The sender is known by SO_PEERCRED, never by what it says.

Lines: ``channel`` with an ``O_PATH`` descriptor of the sender's own bound
ZeroMQ socket file (the server connects to it, see ``server``), and ``uffd`` /
``uffd strict`` with a userfaultfd (hmmd's intake). Everything is bounded: a
connection has ``DEADLINE`` to speak, unanswered connections are capped per uid
and in all, and running out of descriptors pauses accepting instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hmmirror.transport.peer import Peer

log = logging.getLogger(__name__)

#: How long a connected process has to send its line and descriptor.
DEADLINE = 2.0
#: Longest line accepted (the known ones are a few bytes).
LINE_MAX = 64
#: Connections not yet answered, per uid and in all; more are closed at once.
PENDING_PER_UID, PENDING_TOTAL = 8, 64
#: After EMFILE/ENFILE, accepting pauses this long (the backlog holds newcomers).
EMFILE_PAUSE = 0.1
_CRED = struct.Struct("3i")

#: A handler gets the sender and the descriptor; it returns None once it owns the
#: descriptor, or the reason it refuses (the door then closes the descriptor).
Handler = Callable[[Peer, int], str | None]


class DoorError(OSError):
    """The side door refused a descriptor, or could not be reached; the message says why."""


class AddressInUse(OSError):
    """A live server already listens on the side door's path."""


def share_with_group(path: str, group: str) -> None:
    """Make a socket file mode 0660 and, if ``group`` exists, owned by that group."""
    os.chmod(path, 0o660)
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        log.info("no group %r: %s keeps its group", group, path)
        return
    os.chown(path, -1, gid)


def claim(path: str) -> None:
    """Make ``path`` free for a new listener: refuse if a live one answers there.

    A socket file nobody listens on is a stale one from a server that died: it is
    removed. Anything that is not a socket is left alone and refused.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AddressInUse(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale
        return
    except OSError as exc:
        raise AddressInUse(exc.errno or errno.EADDRINUSE, f"cannot probe {path}: {exc}") from exc
    else:
        pid = _CRED.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))[0]
        raise AddressInUse(errno.EADDRINUSE, f"{path} is served by a live process (pid {pid})")
    finally:
        probe.close()


@dataclass
class _Pending:
    """A connection that has not spoken yet."""

    conn: socket.socket
    peer: Peer
    timer: asyncio.TimerHandle


class SideDoor:
    """A listening AF_UNIX socket at ``path`` dispatching lines to ``handlers``."""

    def __init__(self, path: str, handlers: Mapping[bytes, Handler], group: str = "") -> None:
        self.path = path
        self.handlers = handlers
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        claim(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(path)
            self._inode = os.stat(path).st_ino
            if group:
                share_with_group(path, group)
            self.sock.listen(128)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._accept)
        self._pending: dict[int, _Pending] = {}
        self._paused = False
        self.counters = dict.fromkeys(("accepted", "refused", "busy", "emfile"), 0)

    def close(self) -> None:
        """Stop listening, drop unanswered connections, remove the path if it is still ours."""
        if not self._paused:
            self.loop.remove_reader(self.sock.fileno())
        for pending in list(self._pending.values()):
            self._drop(pending.conn)
        self.sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    def _accept(self) -> None:
        """Accept every pending connection; each gets a deadline to send its line."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(exc)
                else:
                    log.warning("side door %s: accept failed: %s", self.path, exc)
                return
            conn.setblocking(False)
            try:
                uid, gid, pid = _credentials(conn)
            except OSError:
                conn.close()
                continue
            peer = Peer(uid=uid, gid=gid, pid=pid)
            mine = sum(1 for p in self._pending.values() if p.peer.uid == uid)
            if len(self._pending) >= PENDING_TOTAL or mine >= PENDING_PER_UID:
                self.counters["busy"] += 1
                _answer(conn, "error too many connections waiting; try again\n")
                conn.close()
                continue
            timer = self.loop.call_later(DEADLINE, self._drop, conn)
            self._pending[conn.fileno()] = _Pending(conn, peer, timer)
            self.loop.add_reader(conn.fileno(), self._receive, conn)

    def _pause(self, exc: OSError) -> None:
        """Out of descriptors: stop accepting for a moment instead of spinning or failing."""
        self.counters["emfile"] += 1
        if self.counters["emfile"] <= 10 or self.counters["emfile"] % 1000 == 0:
            log.warning("side door %s: %s; accepting again in %g s", self.path, exc, EMFILE_PAUSE)
        self._paused = True
        self.loop.remove_reader(self.sock.fileno())
        self.loop.call_later(EMFILE_PAUSE, self._resume)

    def _resume(self) -> None:
        """Accept again after a pause."""
        if self._paused and self.sock.fileno() >= 0:
            self._paused = False
            self.loop.add_reader(self.sock.fileno(), self._accept)
            self._accept()

    def _drop(self, conn: socket.socket) -> None:
        """Forget a connection (answered, refused, or out of time)."""
        pending = self._pending.pop(conn.fileno(), None)
        if pending is not None:
            pending.timer.cancel()
            self.loop.remove_reader(conn.fileno())
        conn.close()

    def _receive(self, conn: socket.socket) -> None:
        """Read the line and the descriptor, hand them on, answer, close."""
        pending = self._pending.get(conn.fileno())
        if pending is None:
            return
        try:
            data, fds, _, _ = socket.recv_fds(conn, LINE_MAX, 4)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        reply = self._judge(pending.peer, data, fds)
        _answer(conn, reply)
        self._drop(conn)

    def _judge(self, peer: Peer, data: bytes, fds: list[int]) -> str:
        """Give exactly one descriptor to the line's handler; close anything not kept."""
        keep: int | None = None
        try:
            handler = self.handlers.get(data.strip())
            if handler is None:
                known = ", ".join(repr(k.decode()) for k in self.handlers)
                return f"error expected one of the lines {known} with one descriptor\n"
            if len(fds) != 1:
                return f"error {data.strip().decode(errors='replace')!r} needs one descriptor\n"
            why = handler(peer, fds[0])
            if why is not None:
                return f"error {why}\n"
            keep = fds[0]
            return "ok\n"
        except Exception as exc:  # a handler bug must not take the door down
            log.exception("side door %s: handler failed", self.path)
            return f"error {type(exc).__name__}\n"
        finally:
            self.counters["accepted" if keep is not None else "refused"] += 1
            for fd in fds:
                if fd != keep:
                    with contextlib.suppress(OSError):
                        os.close(fd)


def _credentials(conn: socket.socket) -> tuple[int, int, int]:
    """SO_PEERCRED of ``conn``: (uid, gid, pid)."""
    pid, uid, gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return uid, gid, pid


def _answer(conn: socket.socket, reply: str) -> None:
    """Best-effort one-line answer on a non-blocking connection."""
    with contextlib.suppress(OSError):
        conn.send(reply.encode()[:256])


def knock(path: str, line: bytes, fd: int, timeout: float) -> None:
    """Hand ``fd`` to the side door at ``path`` with ``line``; raise DoorError unless ``ok``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            socket.send_fds(sock, [line + b"\n"], [fd])
            reply = _read_line(sock)
        except OSError as exc:
            raise DoorError(exc.errno or errno.EIO, f"{path}: {exc.strerror or exc}") from exc
    _check(path, reply)


async def knock_async(path: str, line: bytes, fd: int, timeout: float) -> None:
    """``knock`` without blocking the event loop."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, path)
            # One short line into an empty socket buffer: sendmsg cannot block.
            socket.send_fds(sock, [line + b"\n"], [fd])
            reply = b""
            while b"\n" not in reply and len(reply) < 256:
                chunk = await loop.sock_recv(sock, 256)
                if not chunk:
                    break
                reply += chunk
    except TimeoutError as exc:
        raise DoorError(errno.ETIMEDOUT, f"{path}: no answer in {timeout:g} s") from exc
    except OSError as exc:
        raise DoorError(exc.errno or errno.EIO, f"{path}: {exc.strerror or exc}") from exc
    finally:
        sock.close()
    _check(path, reply.decode(errors="replace"))


def _read_line(sock: socket.socket) -> str:
    """Read one reply line (at most 256 bytes) from a blocking socket."""
    reply = b""
    while b"\n" not in reply and len(reply) < 256:
        chunk = sock.recv(256)
        if not chunk:
            break
        reply += chunk
    return reply.decode(errors="replace")


def _check(path: str, reply: str) -> None:
    """Raise DoorError unless the side door said ``ok``."""
    reply = reply.strip()
    if reply == "ok":
        return
    reason = reply[len("error ") :] if reply.startswith("error ") else (reply or "no answer")
    raise DoorError(errno.EPERM, f"{path} refused: {reason}")
