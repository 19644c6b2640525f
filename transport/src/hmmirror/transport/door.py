"""The door: where a client asks a server (hmmd, hm-agent) to connect to it.

A server's public endpoint is a door owned by Python, not a libzmq listener.
libzmq's ROUTER takes the routing id a peer presents, and aborts the process
when an id it numbers itself collides with one a peer pre-claimed
(``socket_base.cpp``); its ``ipc://`` listener also aborts when descriptors
run out (``ipc_listener.cpp``). So no peer ever reaches a server's ROUTER: the
client binds its own socket and knocks at the door, and the server's ROUTER
*connects* to it under a routing id the server chooses (see ``server``).

Each door connection sends one line and gets ``ok`` or ``error <why>`` back,
then is closed:

- ``ipc://PATH``: a Unix socket at PATH. The line comes with exactly one
  descriptor (SCM_RIGHTS): ``channel`` with an ``O_PATH`` descriptor of the
  client's bound socket file, or (hmmd) ``uffd`` / ``uffd strict`` with a
  userfaultfd. The sender is its SO_PEERCRED, never what it says.
- ``tcp://HOST:PORT``: a TCP socket; the line is ``channel PORT``, the port the
  client bound on the address it knocked from. Who it is, CURVE proves once the
  server connects back.

Everything is bounded: a connection has ``DEADLINE`` to speak, unanswered ones
are capped per uid (or address) and in all, an answered one is closed at once,
and running out of descriptors pauses accepting instead of failing.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import grp
import logging
import os
import select
import socket
import stat
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hmmirror.transport.peer import Peer
from hmmirror.transport.sockowner import LookupUnavailable, is_local, knocker_uid

log = logging.getLogger(__name__)

#: How long a connected client has to send its line (and descriptor).
DEADLINE = 2.0
#: Longest line read (the known ones are a few bytes).
LINE_MAX = 64
#: Connections not yet answered, per uid (or address) and in all; more are closed at once.
PENDING_PER_PEER, PENDING_TOTAL = 8, 64
#: The first word of a refusal that asks the client to knock again a little later.
BUSY = "busy:"
#: How a refusal's reason begins in ``DoorError.why``.
REFUSED = "refused: "
#: After EMFILE/ENFILE, accepting pauses this long (the backlog holds newcomers).
EMFILE_PAUSE = 0.1
_CRED = struct.Struct("3i")
_INT = array.array("i")

#: A handler gets the sender, the line's argument, the descriptor sent with it (-1 on a tcp
#: door) and a pidfd of the sending process (-1 where the kernel gives none: SO_PEERPIDFD is
#: Linux 6.5+); it returns None once it owns the descriptor, or the reason it refuses (the
#: door then closes the descriptor). The pidfd is the door's: valid during the call only.
Handler = Callable[[Peer, str, int, int], str | None]
#: SO_PEERPIDFD (include/uapi/asm-generic/socket.h): a pidfd of the peer at connect time.
SO_PEERPIDFD = 77


class DoorError(OSError):
    """The door refused, or could not be reached: ``why`` says so, ``where`` names the door;
    ``busy`` when it only asked to knock again later."""

    def __init__(self, code: int, where: str, why: str, busy: bool = False) -> None:
        super().__init__(code, f"{where}: {why}")
        self.where = where
        self.why = why
        self.busy = busy

    def __str__(self) -> str:
        return f"{self.where}: {self.why}"


class AddressInUse(OSError):
    """A live server already answers at the door's address (or it is taken otherwise)."""

    def __str__(self) -> str:
        return str(self.strerror)


def share_with_group(path: str, group: str, mode: int = 0o660) -> int:
    """Give the socket file we just bound at ``path`` ``mode`` and, if ``group`` exists,
    that group; return its inode.

    By descriptor, not by path: in a directory another user may write, the path could be
    swapped for a symlink between bind and chmod, and root would chmod what it names.
    The file must be a socket of our own (bind made it so), or OSError. A socket already
    in the group (hmmd.service runs with Group=hmmirror) is left alone: the unit's system
    call filter refuses chown (in @privileged).
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(errno.EEXIST, f"{path} was replaced after it was bound")
        # chmod and chown through /proc follow the descriptor to the inode itself (an O_PATH
        # descriptor refuses fchmod), never a path another user could change meanwhile.
        by_fd = f"/proc/self/fd/{fd}"
        os.chmod(by_fd, mode)
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                log.info("no group %r: %s keeps its group", group, path)
                return st.st_ino
            if st.st_gid != gid:
                os.chown(by_fd, -1, gid)
        return st.st_ino
    finally:
        os.close(fd)


def claim(path: str) -> None:
    """Make ``path`` free for a new door: refuse if a live one answers there.

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
        raise AddressInUse(
            errno.EADDRINUSE,
            f"{path} is served by a live process (pid {pid}); stop it, or choose another path",
        )
    finally:
        probe.close()


def split_tcp(endpoint: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` (``[v6]`` allowed) as (host, port); ValueError if malformed."""
    rest = endpoint[len("tcp://") :]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{endpoint!r} is not tcp://HOST:PORT")
    return host.strip("[]"), int(port)


def tcp_endpoint(host: str, port: int) -> str:
    """The ``tcp://`` endpoint of (host, port), bracketing an IPv6 address."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


@dataclass
class _Pending:
    """A connection that has not spoken yet."""

    conn: socket.socket
    peer: Peer
    key: object
    timer: asyncio.TimerHandle
    pidfd: int = -1


class Door:
    """A listening socket dispatching one-line requests to ``handlers`` by their first word."""

    def __init__(self, sock: socket.socket, handlers: Mapping[str, Handler], where: str) -> None:
        self.sock = sock
        self.handlers = handlers
        self.where = where
        self.local = sock.family == socket.AF_UNIX
        self._inode = -1
        sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._accept)
        self._pending: dict[int, _Pending] = {}
        self._paused = False
        self._said_unattributed = False
        self.counters = dict.fromkeys(("accepted", "refused", "busy", "emfile"), 0)

    @classmethod
    def unix(
        cls, path: str, handlers: Mapping[str, Handler], group: str = "", mode: int = 0o660
    ) -> Door:
        """A door at the Unix socket ``path`` (``mode``, group ``group`` when it exists)."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        claim(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            inode = share_with_group(path, group, mode)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        door = cls(sock, handlers, path)
        door._inode = inode
        return door

    @classmethod
    def tcp(cls, host: str, port: int, handlers: Mapping[str, Handler]) -> Door:
        """A door on TCP (host, port); port 0 picks a free one (see ``port``)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("" if host == "*" else host, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(exc.errno, f"{host}:{port} is in use") from exc
            raise
        return cls(sock, handlers, f"{host}:{port}")

    @property
    def port(self) -> int:
        """The TCP port the door listens on."""
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        """Stop listening, drop unanswered connections, remove the path if it is still ours."""
        if not self._paused:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.sock.fileno())
        for pending in list(self._pending.values()):
            self._drop(pending.conn)
        self.sock.close()
        if self.local:
            with contextlib.suppress(OSError):
                if os.stat(self.where).st_ino == self._inode:
                    os.unlink(self.where)

    # --- accepting ----------------------------------------------------------------------------

    def _accept(self) -> None:
        """Accept every pending connection; each gets a deadline to send its line."""
        while True:
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(exc)
                else:
                    log.warning("door %s: accept failed: %s", self.where, exc)
                return
            conn.setblocking(False)
            try:
                peer, key = self._identify(conn, address)
            except OSError:
                conn.close()
                continue
            pidfd = _peer_pidfd(conn) if self.local else -1
            mine = sum(1 for p in self._pending.values() if p.key == key)
            if len(self._pending) >= PENDING_TOTAL or mine >= PENDING_PER_PEER:
                self._busy(conn, "too many connections waiting", pidfd)
                continue
            timer = self.loop.call_later(DEADLINE, self._drop, conn)
            self._pending[conn.fileno()] = _Pending(conn, peer, key, timer, pidfd)
            self.loop.add_reader(conn.fileno(), self._receive, conn)

    def _identify(self, conn: socket.socket, address: object) -> tuple[Peer, object]:
        """Who connected: SO_PEERCRED on a Unix door, the address on a TCP door."""
        if self.local:
            pid, uid, gid = _CRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
            )
            return Peer(uid=uid, gid=gid, pid=pid), uid
        host = str(address[0]) if isinstance(address, tuple) else str(address)
        # Every user of this host knocks from the same addresses: one from here is counted
        # by its user, as on a Unix door (a remote one by its address).
        if not isinstance(address, tuple):
            return Peer(address=host), host
        try:
            uid = knocker_uid(address, conn.getsockname())
        except LookupUnavailable as exc:
            # Confined without netlink: knocks are counted by address, as before the
            # lookup existed, and said so once.
            if not self._said_unattributed:
                self._said_unattributed = True
                log.warning("door %s: local TCP knocks counted by address: %s", self.where, exc)
            return Peer(address=host), host
        if uid is None and is_local(address):
            # From this host, but its socket is closed already (a knock sent and dropped at
            # once): nobody to answer, and nobody to count it against. Not served.
            raise OSError(errno.ENOTCONN, "a local knock whose socket was closed")
        return Peer(address=host, host_uid=uid), host if uid is None else ("uid", uid)

    def _busy(self, conn: socket.socket, why: str, pidfd: int) -> None:
        """Turn a connection away at once; the client may knock again (``BUSY``)."""
        self.counters["busy"] += 1
        _answer(conn, f"error {BUSY} {why}\n")
        conn.close()
        _close(pidfd)

    def _pause(self, exc: OSError) -> None:
        """Out of descriptors: stop accepting for a moment instead of spinning or failing."""
        self.counters["emfile"] += 1
        if self.counters["emfile"] <= 10 or self.counters["emfile"] % 1000 == 0:
            log.warning("door %s: %s; accepting again in %g s", self.where, exc, EMFILE_PAUSE)
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
            _close(pending.pidfd)
        conn.close()

    # --- a request ----------------------------------------------------------------------------

    def _receive(self, conn: socket.socket) -> None:
        """Read the line (and descriptors), hand them on, answer, close."""
        pending = self._pending.get(conn.fileno())
        if pending is None:
            return
        try:
            data, fds = recv_fds(conn, LINE_MAX, 4 if self.local else 0)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        reply = self._judge(pending.peer, data, fds, pending.pidfd)
        _answer(conn, reply)
        self._drop(conn)

    def _judge(self, peer: Peer, data: bytes, fds: list[int], pidfd: int) -> str:
        """Give the descriptor (exactly one on a Unix door) to the line's handler; close
        anything not kept."""
        keep: int | None = None
        try:
            line = data.decode(errors="replace").strip()
            word, _, arg = line.partition(" ")
            handler = self.handlers.get(word)
            if handler is None:
                known = ", ".join(repr(k) for k in self.handlers)
                return f"error expected a line starting with one of {known}\n"
            if self.local and len(fds) != 1:
                return f"error {word!r} needs exactly one descriptor\n"
            fd = fds[0] if self.local else -1
            why = handler(peer, arg.strip(), fd, pidfd)
            if why is not None:
                return f"error {why}\n"
            keep = fd
            return "ok\n"
        except Exception as exc:  # a handler bug must not take the door down
            log.exception("door %s: handler failed", self.where)
            return f"error {type(exc).__name__}\n"
        finally:
            self.counters["accepted" if keep is not None else "refused"] += 1
            for fd in fds:
                if fd != keep:
                    with contextlib.suppress(OSError):
                        os.close(fd)


def recv_fds(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """``socket.recv_fds``, with the descriptors close-on-exec (``MSG_CMSG_CLOEXEC``): the
    standard one ignores its ``flags`` (CPython 3.11), and a descriptor a peer sent must
    never reach a program its receiver starts. Descriptors past ``maxfds`` are closed by
    the kernel (MSG_CTRUNC), never installed."""
    size = socket.CMSG_LEN(maxfds * _INT.itemsize) if maxfds else 0
    data, ancdata, _, _ = sock.recvmsg(bufsize, size, socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def _peer_pidfd(conn: socket.socket) -> int:
    """A pidfd of the process that connected (SO_PEERPIDFD), or -1 where there is none."""
    try:
        return int(conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError:
        return -1


def _close(fd: int) -> None:
    """Close ``fd`` if it is one."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def _answer(conn: socket.socket, reply: str) -> None:
    """Best-effort one-line answer on a non-blocking connection."""
    with contextlib.suppress(OSError):
        conn.send(reply.encode()[:256])


# --- knocking (the client side) ------------------------------------------------------------------

_WHY = {
    errno.ENOENT: "no such socket (is the server running?)",
    errno.ECONNREFUSED: "nothing listens there (is the server running?)",
    errno.EACCES: "permission denied (is this user in the socket's group?)",
    errno.EPERM: "permission denied (is this user in the socket's group?)",
}


def unreachable(where: str, exc: OSError) -> DoorError:
    """A DoorError saying, in one line, why the door at ``where`` could not be reached."""
    code = exc.errno or errno.EIO
    why = _WHY.get(code) or exc.strerror or str(exc) or type(exc).__name__
    return DoorError(code, where, why)


#: CAP_SYS_PTRACE's bit in /proc/PID/status's CapEff (include/uapi/linux/capability.h).
CAP_SYS_PTRACE = 19


def serves_a_tracer(sock: socket.socket, where: str) -> None:
    """Raise DoorError unless the process serving the Unix socket ``sock`` (its SO_PEERCRED)
    could ptrace this one anyway: our own user, or CAP_SYS_PTRACE in its effective set.

    What a knock hands over may be worth as much as ptrace (a userfaultfd lets its holder
    fill this process's pages): a socket at a path another user bound first must not get
    it. Its status counts only if its pidfd shows it still alive once read (a pid reused
    since it called listen() names another process)."""
    pid, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    pidfd = _peer_pidfd(sock)
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        if pidfd >= 0 and select.select([pidfd], [], [], 0)[0]:  # readable: it exited
            status = ""
    except OSError:
        status = ""
    finally:
        _close(pidfd)
    caps = next(
        (line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), "0"
    )
    if status and (uid == os.geteuid() or int(caps, 16) >> CAP_SYS_PTRACE & 1):
        return
    raise DoorError(
        errno.EPERM, where,
        f"the process serving it (pid {pid}, uid {uid}) could not ptrace this one: refused",
    )  # fmt: skip


def knock(
    path: str,
    line: bytes,
    fd: int,
    timeout: float,
    vet: Callable[[socket.socket, str], None] | None = None,
) -> None:
    """Hand ``fd`` to the Unix door at ``path`` with ``line``; raise DoorError unless ``ok``.
    ``vet`` judges the server once connected, before anything is sent (``serves_a_tracer``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            if vet is not None:
                vet(sock, path)
            socket.send_fds(sock, [line + b"\n"], [fd])
            reply = read_reply(sock)
        except DoorError:  # the vetting's own reason
            raise
        except OSError as exc:
            raise unreachable(path, exc) from exc
    check_reply(path, reply)


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
            reply = await read_reply_async(sock)
    except TimeoutError as exc:
        raise DoorError(errno.ETIMEDOUT, path, f"no answer in {timeout:g} s") from exc
    except OSError as exc:
        raise unreachable(path, exc) from exc
    finally:
        sock.close()
    check_reply(path, reply)


def read_reply(sock: socket.socket) -> str:
    """Read one reply line (at most 256 bytes) from a blocking socket."""
    reply = b""
    while b"\n" not in reply and len(reply) < 256:
        chunk = sock.recv(256)
        if not chunk:
            break
        reply += chunk
    return reply.decode(errors="replace")


async def read_reply_async(sock: socket.socket) -> str:
    """Read one reply line (at most 256 bytes) from a non-blocking socket."""
    loop = asyncio.get_running_loop()
    reply = b""
    while b"\n" not in reply and len(reply) < 256:
        chunk = await loop.sock_recv(sock, 256)
        if not chunk:
            break
        reply += chunk
    return reply.decode(errors="replace")


def check_reply(where: str, reply: str) -> None:
    """Raise DoorError unless the door said ``ok``."""
    reply = reply.strip()
    if reply == "ok":
        return
    reason = reply[len("error ") :] if reply.startswith("error ") else (reply or "no answer")
    if reason.startswith(BUSY):
        raise DoorError(errno.EAGAIN, where, f"busy: {reason[len(BUSY) :].strip()}", busy=True)
    raise DoorError(errno.EPERM, where, f"{REFUSED}{reason}")
