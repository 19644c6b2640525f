"""The injector: a helper process that runs hmmd's ptrace injections, so a dying hmmd never
leaves a target mid-injection.

An injection (``inject``) holds the target stopped with its registers replaced, or
single-stepping through a system call, until the tracer restores them. A tracer that
dies in between (hmmd SIGKILLed, or crashed) is detached by the kernel with the
registers still replaced and single-step still set (``exit_ptrace`` detaches without
``ptrace_disable``, which only a voluntary PTRACE_DETACH runs): the target then takes
a SIGTRAP, which kills it, or runs on with the injected call's registers. So hmmd
does not trace targets itself. It hands each injection to this long-lived child, in
a session of its own, over a SOCK_SEQPACKET socketpair. The child ignores the
signals a stop, a terminal or systemd's watchdog sends, finishes and undoes the
injection in hand whatever became of hmmd, and exits when hmmd's end of the socket
closes. Under the unit it shares hmmd's cgroup, so an injection must end well
within ``TimeoutStopSec=`` (10 s): one populate chunk takes tens of milliseconds.

Requests are JSON with the target's pidfd attached (SCM_RIGHTS). The helper checks
that the pidfd's process still lives once the pid is seized, so a reused pid is
never injected into. Replies carry the outcome, and the new userfaultfd for
``userfaultfd``, the same way. hmmd's side (``populate_write``, ``inject_userfaultfd``)
raises what ``inject``'s functions raise, so callers see no difference.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from hmmirror.daemon.linux import inject

#: How long hmmd waits for one populate (a 64 MiB chunk takes tens of milliseconds; a
#: helper that starts takes a few hundred). Past it the helper is let go: it finishes the
#: injection it holds, undoing it, and exits; the next request starts a new one.
REPLY_DEADLINE = 60.0
#: How long hmmd's event loop waits for a userfaultfd injection (a few stops of the target).
USERFAULTFD_DEADLINE = 5.0
#: Helpers let go that may still be blocked in their target's page fault: beyond this many,
#: injections are refused until one returns, so a target that blocks them cannot make hmmd
#: start helpers without end.
MAX_RELEASED = 4
#: Signals the helper ignores: a stop, a terminal, the unit's watchdog (SIGABRT) and
#: control-group kill all reach it; it exits when hmmd's end of the socket closes.
IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGABRT)
#: The longest request or reply: a run list of one populate chunk is far smaller.
_MESSAGE_MAX = 1 << 20


class Injector:
    """hmmd's handle on the helper process, started on first use; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        #: Helpers let go (deadline passed) that may still be finishing; reaped when done.
        self._released: list[subprocess.Popen[bytes]] = []

    @property
    def pid(self) -> int | None:
        """The running helper's pid, or None before the first injection."""
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        """Start the helper now, if it does not run (the first injection would)."""
        with self._lock:
            self._started()

    def call(
        self, request: dict[str, Any], pidfd: int, deadline: float = REPLY_DEADLINE
    ) -> tuple[dict[str, Any], int | None]:
        """Send ``request`` with ``pidfd``; the reply and the descriptor it carried, if any.

        Raises InjectError when the helper cannot be started, dies, or does not answer
        within ``deadline`` seconds, and when another injection keeps it busy that long.
        """
        if not self._lock.acquire(timeout=deadline):
            raise inject.InjectError(f"another injection kept hmmd busy for {deadline:g} s")
        try:
            sock = self._started()
            try:
                socket.send_fds(sock, [json.dumps(request).encode()], [pidfd])
                if not select.select([sock], [], [], deadline)[0]:
                    self._release()
                    raise inject.InjectError(f"the injector did not answer within {deadline:g} s")
                message, fds, _, _ = socket.recv_fds(sock, _MESSAGE_MAX, 1)
            except OSError as exc:
                self._release()
                raise inject.InjectError(f"the injector process failed: {exc}") from exc
            if not message:
                self._release()
                raise inject.InjectError("the injector process exited")
            reply: dict[str, Any] = json.loads(message)
            return reply, fds[0] if fds else None
        finally:
            self._lock.release()

    def close(self, timeout: float = 2.0) -> None:
        """Close hmmd's end; the helper exits once done. Wait ``timeout`` s for it to go.

        Where an injection still runs, its worker keeps the socket: hmmd's exit closes it."""
        if not self._lock.acquire(timeout=timeout):
            return
        try:
            proc = self._proc
            self._release()
        finally:
            self._lock.release()
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)

    def _started(self) -> socket.socket:
        """The socket to a running helper, started now if there is none (lock held)."""
        self._released = [p for p in self._released if p.poll() is None]
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            return self._sock
        self._release()
        if len(self._released) >= MAX_RELEASED:
            raise inject.InjectError(
                f"{len(self._released)} earlier injections are still blocked in their targets"
            )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                # -P: hmmd's working directory never lends the helper a module.
                [sys.executable, "-P", "-m", __name__, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's ^C or a signal to hmmd's group misses it
            )
        except OSError as exc:
            ours.close()
            raise inject.InjectError(f"cannot start the injector process: {exc}") from exc
        finally:
            theirs.close()
        self._sock = ours
        return ours

    def _release(self) -> None:
        """Let the current helper go (lock held): it finishes what it holds and exits."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._released.append(self._proc)
            self._proc = None


#: hmmd's one injector.
INJECTOR = Injector()


def _raise(reply: dict[str, Any]) -> None:
    """Raise what the helper's injection raised, as ``inject`` would have in-process."""
    error = reply.get("error")
    message = str(reply.get("message", "the injector gave no reason"))
    if error is None:
        return
    if error == "call":
        raise inject.CallFailed(int(reply.get("errno", 0)), message)
    if error == "gone":
        raise ProcessLookupError(message)
    raise inject.InjectError(message)


def populate_write(
    pid: int, pidfd: int, runs: Sequence[tuple[int, int]], own_userfaultfds: Sequence[int] = ()
) -> None:
    """``inject.populate_write`` in the helper: ``pidfd`` must be ``pid``'s."""
    request = {"op": "populate", "pid": pid, "runs": list(runs), "own": list(own_userfaultfds)}
    reply, fd = INJECTOR.call(request, pidfd)
    if fd is not None:
        os.close(fd)
    _raise(reply)


def inject_userfaultfd(pid: int, pidfd: int) -> int:
    """``inject.inject_userfaultfd`` in the helper; hmmd's copy of the new userfaultfd.

    Called on hmmd's event loop: waits at most ``USERFAULTFD_DEADLINE``, a COW break in
    progress included."""
    reply, fd = INJECTOR.call({"op": "userfaultfd", "pid": pid}, pidfd, USERFAULTFD_DEADLINE)
    if fd is None:
        _raise(reply)
        raise inject.InjectError("the injector sent no userfaultfd")
    return fd


# --- the helper process -------------------------------------------------------------------


def _serve_one(request: dict[str, Any], pidfd: int) -> tuple[dict[str, Any], int | None]:
    """Run one injection; the reply, and a descriptor to send with it."""
    try:
        pid = int(request["pid"])
        if request["op"] == "populate":
            runs = [(int(addr), int(length)) for addr, length in request["runs"]]
            own = frozenset(int(inode) for inode in request.get("own", ()))
            inject.populate_write(pid, runs, pidfd, own)
            return {}, None
        if request["op"] == "userfaultfd":
            return {}, inject.inject_userfaultfd(pid, pidfd)
        return {"error": "refused", "message": f"unknown request {request['op']!r}"}, None
    except inject.CallFailed as exc:
        return {"error": "call", "errno": exc.errno, "message": str(exc)}, None
    except ProcessLookupError as exc:
        return {"error": "gone", "message": str(exc)}, None
    except (inject.InjectError, OSError, KeyError, TypeError, ValueError) as exc:
        return {"error": "refused", "message": str(exc)}, None


def serve(sock: socket.socket) -> None:
    """The helper's loop: one request at a time until hmmd's end closes."""
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, _MESSAGE_MAX, 4)
        except OSError:
            return
        if not message:
            for fd in fds:
                os.close(fd)
            return
        try:
            if len(fds) != 1:
                reply, out = {"error": "refused", "message": "a request carries one pidfd"}, None
            else:
                reply, out = _serve_one(json.loads(message), fds[0])
        finally:
            for fd in fds:
                os.close(fd)
        try:
            socket.send_fds(sock, [json.dumps(reply).encode()], [] if out is None else [out])
        except OSError:
            pass  # hmmd went away: the injection is undone all the same
        finally:
            if out is not None:
                os.close(out)


def main(argv: Sequence[str]) -> None:
    """Entry point: serve on the inherited socket descriptor ``argv[0]``."""
    # hmmd's stop, a terminal's signals, the watchdog's abort: an injection in hand is
    # finished and undone first, and the socket's close (hmmd gone) is what ends this process.
    for sig in IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    try:
        serve(sock)
    finally:
        sock.close()


if __name__ == "__main__":
    main(sys.argv[1:])
