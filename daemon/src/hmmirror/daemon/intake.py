"""Where targets hand hmmd their userfaultfd: a unix socket that takes one fd per connection.

A cooperating target (``hmmirror.client.expose()``) creates a userfaultfd and
sends it with SCM_RIGHTS; ZeroMQ sockets cannot carry descriptors, hence this
small side door next to the main socket, with the same 0660 permissions. The
sender is identified by SO_PEERCRED, never by anything it says. The exchange
is one line each way: ``uffd`` or ``uffd strict`` (plus the fd), then ``ok``
or ``error <why>``. A strict fd is the second uffd that strict-write mirrors need.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable

from hmmirror.daemon.server import share_with_group

log = logging.getLogger(__name__)

#: How long a connected target has to send its line and fd.
SEND_DEADLINE = 2.0
_CRED = struct.Struct("3i")


class UffdIntake:
    """A listening AF_UNIX socket at ``path``; ``on_fd(pid, fd, strict)`` returns None or a
    refusal."""

    def __init__(
        self, path: str, on_fd: Callable[[int, int, bool], str | None], group: str = "hmmirror"
    ) -> None:
        self.path = path
        self.on_fd = on_fd
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket of an earlier hmmd
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        share_with_group(path, group)
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._accept)
        self._conns: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}
        self.received = 0
        self.refused = 0

    def close(self) -> None:
        """Stop listening and drop half-open connections."""
        self.loop.remove_reader(self.sock.fileno())
        for conn, timer in list(self._conns.values()):
            timer.cancel()
            self._drop(conn)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _accept(self) -> None:
        """Accept every pending connection; each gets a deadline to send its fd."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("uffd intake accept failed: %s", exc)
                return
            conn.setblocking(False)
            timer = self.loop.call_later(SEND_DEADLINE, self._drop, conn)
            self._conns[conn.fileno()] = (conn, timer)
            self.loop.add_reader(conn.fileno(), self._receive, conn)

    def _drop(self, conn: socket.socket) -> None:
        """Forget a connection (done, refused, or out of time)."""
        entry = self._conns.pop(conn.fileno(), None)
        if entry is not None:
            entry[1].cancel()
            self.loop.remove_reader(conn.fileno())
        conn.close()

    def _receive(self, conn: socket.socket) -> None:
        """Read the line and the fd, identify the sender, and hand the fd on."""
        fds = array.array("i")
        try:
            data, ancdata, _, _ = conn.recvmsg(64, socket.CMSG_SPACE(4 * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        reply = self._judge(conn, data, list(fds))
        with contextlib.suppress(OSError):
            conn.send(reply.encode())
        self._drop(conn)

    def _judge(self, conn: socket.socket, data: bytes, fds: list[int]) -> str:
        """Accept exactly one userfaultfd from an identified sender; close anything else."""
        keep: int | None = None
        try:
            pid, _, _ = _CRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
            )
            line = data.strip()
            if line not in (b"uffd", b"uffd strict") or len(fds) != 1:
                return "error expected the line 'uffd' or 'uffd strict' and one descriptor\n"
            if os.readlink(f"/proc/self/fd/{fds[0]}") != "anon_inode:[userfaultfd]":
                return "error the descriptor is not a userfaultfd\n"
            why = self.on_fd(pid, fds[0], line == b"uffd strict")
            if why is not None:
                return f"error {why}\n"
            keep = fds[0]
            self.received += 1
            return "ok\n"
        except OSError as exc:
            return f"error {exc}\n"
        finally:
            if keep is None:
                self.refused += 1
            for fd in fds:
                if fd != keep:
                    with contextlib.suppress(OSError):
                        os.close(fd)


def default_path(endpoint: str) -> str:
    """Next to an ``ipc://`` endpoint's socket; in the runtime directory otherwise."""
    if endpoint.startswith("ipc://"):
        return endpoint[len("ipc://") :] + ".uffd"
    runtime = os.environ.get("RUNTIME_DIRECTORY", "/run/hmmirror").split(":")[0]
    return os.path.join(runtime, "hmmd.uffd.sock")
