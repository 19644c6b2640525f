"""The injector: a helper process that runs hmmd's ptrace injections, so a dying hmmd never
leaves a target mid-injection.

An injection (``inject``) holds the target stopped with its registers replaced, or
single-stepping through a system call, until the tracer restores them. A tracer that
dies in between (hmmd SIGKILLed, or crashed) is detached by the kernel with the
registers still replaced and single-step still set (``exit_ptrace`` detaches without
``ptrace_disable``, which only a voluntary PTRACE_DETACH runs): the target then takes
a SIGTRAP, which kills it, or runs on with the injected call's registers. So hmmd
does not trace targets itself. It hands each injection to a long-lived child, one
per user whose processes it injects into (so a user whose processes block an
injection holds back only its own), in a session of its own, over a SOCK_SEQPACKET
socketpair. The child ignores the signals a stop, a terminal or systemd's watchdog
sends, finishes and undoes the injection in hand whatever became of hmmd, and exits
when hmmd's end of the socket closes. Under the unit it shares hmmd's cgroup: a stop
SIGKILLs it ``TimeoutStopSec=`` (10 s) after hmmd's SIGTERM. One populate chunk takes
tens of milliseconds; only an injection already blocked in its target for good
(docs/ARCHITECTURE.md §A.3) is cut short, and that target's thread is left with the
injected registers.

Requests are JSON with the target's pidfd attached (SCM_RIGHTS). The helper checks
that the pidfd's process still lives once the pid is seized, so a reused pid is
never injected into. Replies carry the outcome, and the new userfaultfd for
``userfaultfd``, the same way. hmmd's side (``populate_write``, ``inject_userfaultfd``)
raises what ``inject``'s functions raise, so callers see no difference.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from hmmirror.daemon.linux import inject, userfaultfd
from hmmirror.transport.door import recv_fds

#: How long hmmd waits for one populate (a 64 MiB chunk takes tens of milliseconds; a
#: helper that starts takes a few hundred). Past it the helper is let go: it finishes the
#: injection it holds, undoing it, and exits; the next request starts a new one.
REPLY_DEADLINE = 60.0
#: How long hmmd's event loop waits for a userfaultfd injection (a few stops of the target,
#: a few milliseconds), and before it for another injection into the same user's processes
#: (a populate chunk takes tens of milliseconds).
USERFAULTFD_DEADLINE = 1.5
USERFAULTFD_LOCK_WAIT = 0.25
#: Time userfaultfd injections held the event loop within SPENT_WINDOW s: a user's past
#: USER_BUDGET pauses that user's for USER_PAUSE s and everyone's for ALL_PAUSE s; everyone's
#: past ALL_BUDGET pauses everyone's. One turn of the event loop, which may carry many
#: registers, so waits on injections for about a budget at most (an agent's lease is 3 s,
#: the watchdog's ping every 5 s); paused targets get the proc watcher.
SPENT_WINDOW = 1.0
USER_BUDGET = 0.3
ALL_BUDGET = 0.6
USER_PAUSE = 30.0
ALL_PAUSE = 2.0
#: Helpers of one user let go that may still be blocked in their target's page fault:
#: beyond this many, that user's injections are refused until one returns.
MAX_RELEASED = 2
#: Users with a helper at once (each helper serves the targets of one user, so a user whose
#: targets block injections blocks only its own); an idle helper goes after IDLE_EXIT s.
MAX_USERS = 32
IDLE_EXIT = 60.0
#: Runs per request: a request of 2048 runs is ~60 KiB of JSON, well within the socket's
#: buffer (a populate chunk may be cut into 16384 one-page runs).
RUNS_PER_REQUEST = 2048
#: Signals the helper ignores: a stop, a terminal, the unit's watchdog (SIGABRT) and
#: control-group kill all reach it; it exits when hmmd's end of the socket closes.
IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGABRT)
#: The longest request or reply.
_MESSAGE_MAX = 1 << 20


class ClosedInjector(inject.InjectError):
    """The helper was closed (idle, or to make room) after its caller took it: ask again."""


class Injector:
    """hmmd's handle on one helper process, started on first use; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        #: Helpers let go (deadline passed) that may still be finishing; reaped when done.
        self._released: list[subprocess.Popen[bytes]] = []
        #: When it was last handed out or last answered (time.monotonic()).
        self.last_used = time.monotonic()
        #: Closed by hmmd: its calls are refused (a caller that took it before asks again).
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The running helper's pid, or None before the first injection."""
        return None if self._proc is None else self._proc.pid

    def start(self, lock_wait: float = -1) -> float:
        """Start the helper now, if it does not run (the first injection would); not if
        another call keeps it busy for ``lock_wait`` s. Returns the seconds spent waiting
        for that call (the start itself is hmmd's cost, not a target's)."""
        t0 = time.monotonic()
        if not self._lock.acquire(timeout=lock_wait):
            return time.monotonic() - t0
        waited = time.monotonic() - t0
        try:
            self._started()
        finally:
            self._lock.release()
        return waited

    def idle(self, now: float, after: float = IDLE_EXIT) -> bool:
        """Whether it was not used for ``after`` s and no call runs now, nor any let go."""
        return (
            now - self.last_used > after
            and not self._lock.locked()
            and not [p for p in self._released if p.poll() is None]
        )

    def call(
        self,
        request: dict[str, Any],
        pidfd: int,
        deadline: float = REPLY_DEADLINE,
        lock_wait: float = REPLY_DEADLINE,
    ) -> tuple[dict[str, Any], int | None]:
        """Send ``request`` with ``pidfd``; the reply and the descriptor it carried, if any.

        Raises InjectError when the helper cannot be started, dies, or does not answer
        within ``deadline`` seconds, and when another injection keeps it busy for
        ``lock_wait`` seconds; ClosedInjector once it was closed.
        """
        if not self._lock.acquire(timeout=lock_wait):
            raise inject.InjectError(
                f"another injection into this user's processes ran for {lock_wait:g} s"
            )
        try:
            return self._exchange(request, pidfd, deadline)
        finally:
            self.last_used = time.monotonic()
            self._lock.release()

    def _exchange(
        self, request: dict[str, Any], pidfd: int, deadline: float
    ) -> tuple[dict[str, Any], int | None]:
        """``call`` under the lock."""
        sock = self._started()
        try:
            socket.send_fds(sock, [json.dumps(request).encode()], [pidfd])
            poller = select.poll()  # not select(): hmmd's descriptors may number past 1023
            poller.register(sock, select.POLLIN)
            if not poller.poll(deadline * 1000):
                self._release()
                raise inject.InjectError(f"the injector did not answer within {deadline:g} s")
            message, fds = recv_fds(sock, _MESSAGE_MAX, 1)
            reply: dict[str, Any] = json.loads(message) if message else {}
        except (OSError, ValueError) as exc:
            self._release()  # a reply may still come: it must never be taken for the next one
            raise inject.InjectError(f"the injector process failed: {exc}") from exc
        if not message:
            self._release()
            raise inject.InjectError("the injector process exited")
        return reply, fds[0] if fds else None

    def shut(self, lock_wait: float) -> subprocess.Popen[bytes] | bool | None:
        """Close hmmd's end (the helper exits once its injection is done) and refuse later
        calls. Returns the process to wait for (None: none ran), or False if a call kept it
        busy for ``lock_wait`` s: then nothing changed."""
        if not self._lock.acquire(timeout=lock_wait):
            return False
        try:
            self._closed = True
            proc = self._proc
            self._release()
            return proc
        finally:
            self._lock.release()

    def _started(self) -> socket.socket:
        """The socket to a running helper, started now if there is none (lock held)."""
        if self._closed:
            raise ClosedInjector("the injector of this user's processes was closed")
        self._released = [p for p in self._released if p.poll() is None]
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            return self._sock
        self._release()
        if len(self._released) >= MAX_RELEASED:
            raise inject.InjectError(
                f"{len(self._released)} earlier injections are still blocked in this user's "
                "processes"
            )
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            raise inject.InjectError(f"cannot start the injector process: {exc}") from exc
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


class Injectors:
    """hmmd's helpers, one per user whose processes it injects into; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_uid: dict[int, Injector] = {}
        #: Userfaultfd injections paused: by uid, and for all, until these times.
        self._paused: dict[int, float] = {}
        self._all_paused = 0.0
        #: (when, uid, seconds) of the userfaultfd injections of the last SPENT_WINDOW s.
        self._spent: list[tuple[float, int, float]] = []

    def of(self, pid: int, pidfd: int) -> tuple[Injector, int]:
        """The helper for ``pid``'s user (its real uid, read while ``pidfd`` shows the pid is
        still its process), and that uid. Raises InjectError beyond MAX_USERS busy users,
        ProcessLookupError if the process is gone."""
        # hmmd's side only: the helper, which never gets here, starts without numpy.
        from hmmirror.daemon.linux.procfs import real_uid

        uid = real_uid(pid)
        inject.still_theirs(pid, pidfd)  # the uid read was not a reused pid's
        with self._lock:
            found = self._by_uid.get(uid)
            if found is None:
                self._make_room()
                found = self._by_uid[uid] = Injector()
            found.last_used = time.monotonic()  # not idle: its caller is about to call it
            return found, uid

    def _make_room(self) -> None:
        """Close helpers unused for IDLE_EXIT s; at MAX_USERS, the least recently used one
        unused for a second and not busy (registry lock held). InjectError if none is."""
        now = time.monotonic()
        for uid, helper in list(self._by_uid.items()):
            if helper.idle(now) and helper.shut(0) is not False:
                del self._by_uid[uid]
        if len(self._by_uid) < MAX_USERS:
            return
        for uid, helper in sorted(self._by_uid.items(), key=lambda item: item[1].last_used):
            if helper.idle(now, after=1.0) and helper.shut(0) is not False:
                del self._by_uid[uid]
                return
        raise inject.InjectError(f"hmmd is injecting into the processes of {MAX_USERS} users")

    def check_paused(self, uid: int) -> None:
        """Raise InjectError while userfaultfd injections are paused for ``uid``."""
        now = time.monotonic()
        with self._lock:
            until = max(self._all_paused, self._paused.get(uid, 0.0))
            if now < until:
                raise inject.InjectError(
                    f"userfaultfd injections paused for {until - now:.1f} s: they held "
                    "hmmd's event loop too long"
                )

    def took(self, uid: int, seconds: float) -> None:
        """A userfaultfd injection for ``uid`` held the event loop ``seconds``, failed or not:
        pause when the last second's add up past a budget."""
        now = time.monotonic()
        with self._lock:
            self._spent = [e for e in self._spent if now - e[0] < SPENT_WINDOW]
            self._spent.append((now, uid, seconds))
            self._paused = {u: t for u, t in self._paused.items() if t > now}
            if sum(s for _, u, s in self._spent if u == uid) >= USER_BUDGET:
                self._paused[uid] = now + USER_PAUSE
                self._all_paused = now + ALL_PAUSE
            elif sum(s for _, _, s in self._spent) >= ALL_BUDGET:
                self._all_paused = now + ALL_PAUSE

    def close(self, timeout: float = 2.0) -> None:
        """hmmd stops: every helper's end closes (each exits once its injection is done);
        wait ``timeout`` s in all for them to go."""
        with self._lock:
            helpers = list(self._by_uid.values())
            self._by_uid.clear()
            self._paused.clear()
            self._all_paused = 0.0
            self._spent.clear()
        deadline = time.monotonic() + timeout
        procs = [helper.shut(timeout) for helper in helpers]
        for proc in procs:
            if isinstance(proc, subprocess.Popen):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(0.0, deadline - time.monotonic()))


#: hmmd's helpers.
INJECTORS = Injectors()


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
    """``inject.populate_write`` in ``pid``'s user's helper: ``pidfd`` must be ``pid``'s.
    Many runs go as several requests, each a whole injection."""
    for at in range(0, len(runs), RUNS_PER_REQUEST):
        part = [list(run) for run in runs[at : at + RUNS_PER_REQUEST]]
        request = {"op": "populate", "pid": pid, "runs": part, "own": list(own_userfaultfds)}
        try:
            reply, fd = INJECTORS.of(pid, pidfd)[0].call(request, pidfd)
        except ClosedInjector:  # closed between being handed out and called: ask again
            reply, fd = INJECTORS.of(pid, pidfd)[0].call(request, pidfd)
        if fd is not None:
            os.close(fd)
        _raise(reply)


def inject_userfaultfd(pid: int, pidfd: int) -> int:
    """``inject.inject_userfaultfd`` in the helper; hmmd's copy of the new userfaultfd.

    Called on hmmd's event loop: waits at most ``USERFAULTFD_LOCK_WAIT`` (twice) for
    another injection into the same user's processes, then ``USERFAULTFD_DEADLINE``; what
    the waits add up to pauses these injections (``Injectors.took``)."""
    try:
        return _inject_userfaultfd(pid, pidfd)
    except ClosedInjector:  # closed between being handed out and called: ask again
        return _inject_userfaultfd(pid, pidfd)


def _inject_userfaultfd(pid: int, pidfd: int) -> int:
    """``inject_userfaultfd``, once."""
    try:
        helper, uid = INJECTORS.of(pid, pidfd)
    except ProcessLookupError as exc:  # its callers take InjectError: no watch for this one
        raise inject.InjectError(f"process {pid} has exited") from exc
    INJECTORS.check_paused(uid)
    waited = helper.start(USERFAULTFD_LOCK_WAIT)  # its start (tens of ms) is hmmd's cost
    t0 = time.monotonic()
    try:
        reply, fd = helper.call(
            {"op": "userfaultfd", "pid": pid}, pidfd, USERFAULTFD_DEADLINE, USERFAULTFD_LOCK_WAIT
        )
    finally:
        INJECTORS.took(uid, waited + time.monotonic() - t0)
    if fd is None:
        _raise(reply)
        raise inject.InjectError("the injector sent no userfaultfd")
    if not userfaultfd.is_userfaultfd(fd):
        os.close(fd)
        raise inject.InjectError(
            f"the injector sent a descriptor of process {pid} that is not a userfaultfd"
        )
    return fd


# --- the helper process -------------------------------------------------------------------


def _serve_one(message: bytes, pidfd: int) -> tuple[dict[str, Any], int | None]:
    """Run the injection ``message`` asks for; the reply, and a descriptor to send with it."""
    try:
        request = json.loads(message)
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
    except (inject.InjectError, OSError, KeyError, TypeError, ValueError, RecursionError) as exc:
        return {"error": "refused", "message": str(exc)}, None


def serve(sock: socket.socket) -> None:
    """The helper's loop: one request at a time until hmmd's end closes; meanwhile, tracees
    a failed detach left attached are let go as soon as they stop."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while True:
        if inject.finish_detaches() and not poller.poll(50):
            continue
        try:
            message, fds = recv_fds(sock, _MESSAGE_MAX, 4)
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
                reply, out = _serve_one(message, fds[0])
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
    # One line per warning on hmmd's stderr (the journal, under the unit).
    logging.basicConfig(level=logging.WARNING, format="hmmd injector: %(message)s")
    sock = socket.socket(fileno=int(argv[0]))
    try:
        serve(sock)
    finally:
        sock.close()


if __name__ == "__main__":
    main(sys.argv[1:])
