"""hmmds for the tests, forked from a process that imported hmmd once.

Starting hmmd is mostly Python importing numpy, pyzmq and the daemon: about half a second
on the 2-vCPU machines, and the suite starts hmmd over a thousand times. The fork server
imports them once, then forks each hmmd from there: the child runs the very ``main`` the
``hmmd`` command runs, with the caller's arguments, environment and working directory,
stdout on its own pipe and stderr in its log file. The server reaps its children and
reports each exit status, so the caller's handle (:class:`ForkedProcess`) answers as a
``subprocess.Popen`` does.

``launch_hmmd`` uses it once a caller set ``FORK_SERVER.enabled`` (the test suite's
conftest does, unless ``HMMIRROR_TEST_FORKSERVER=0``; the demo, ``hmmctl check`` and the
benchmarks never do), and then for its default starter only (no ``spawn`` and no
interpreter options). The server exits when the process
that started it closes its end of the socket (it exits too), and a child started with
``pdeathsig`` then gets SIGTERM, as one started by ``subprocess.Popen`` does when its
starter goes.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

#: Longest request or reply (a request carries the caller's environment).
_MESSAGE_MAX = 1 << 20
#: How long a caller waits for the server to fork and answer.
_REPLY_DEADLINE = 10.0
_PR_SET_PDEATHSIG = 1
#: What every hmmd imports by the time it is ready: the server imports it once.
PRELOADED = ("hmmirror.daemon.__main__", "hmmirror.daemon.app", "uvloop")


class ForkServerError(RuntimeError):
    """The fork server did not start or did not answer in time."""


class ForkedProcess:
    """A forked hmmd, answering as much of ``subprocess.Popen`` as the tests use."""

    def __init__(self, pid: int, args: list[str], fds: Sequence[int]) -> None:
        stdout_fd, self._status_fd, pidfd = fds
        self.pid = pid
        self.args = args
        self.stdout: Any = os.fdopen(stdout_fd, "rb")
        self.stdin = None
        self.stderr = None
        self.returncode: int | None = None
        self._lock = threading.Lock()
        #: Opened by the server before it could reap the child: never a later process.
        self._pidfd: int | None = pidfd

    def _collect(self, timeout: float | None) -> int | None:
        """The exit status once the server reported it (within ``timeout`` s; None: wait)."""
        if self.returncode is None:
            select.select([self._status_fd], [], [], timeout)
        with self._lock:
            if self.returncode is not None:
                return self.returncode
            if not select.select([self._status_fd], [], [], 0)[0]:
                return None
            text = os.read(self._status_fd, 64)
            os.close(self._status_fd)
            # No status: the server itself was killed, and its child with it.
            self.returncode = int(text) if text else -int(signal.SIGKILL)
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
            return self.returncode

    def poll(self) -> int | None:
        """The exit status, or None while it runs."""
        return self._collect(0)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit status; ``subprocess.TimeoutExpired`` after ``timeout`` s."""
        code = self._collect(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        """Signal it through its pidfd (never a later process with its pid)."""
        with self._lock:
            if self.returncode is None and self._pidfd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        """SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The caller's side: starts the server on first use; thread-safe."""

    def __init__(self) -> None:
        #: Whether ``launch_hmmd`` forks its hmmds here (off unless a caller turns it on).
        self.enabled = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def _started(self) -> socket.socket:
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            return self._sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "hmmirror.testing.forkserver", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
            )  # fmt: skip
        finally:
            theirs.close()
        ours.settimeout(_REPLY_DEADLINE)
        self._sock = ours
        atexit.register(self.close)
        return ours

    def spawn(
        self,
        argv: list[str],
        main_args: Sequence[str],
        log_path: str,
        append: bool,
        pdeathsig: bool,
        env: Mapping[str, str] | None = None,
    ) -> ForkedProcess:
        """Fork an hmmd that runs ``main(main_args)``; ``argv`` is what it stands for."""
        request = {
            "args": list(main_args),
            "log": log_path,
            "append": append,
            "pdeathsig": pdeathsig,
            "cwd": os.getcwd(),
            "env": dict(os.environ if env is None else env),
        }
        with self._lock:
            sock = self._started()
            try:
                sock.send(json.dumps(request).encode())
                message, fds, _, _ = socket.recv_fds(sock, _MESSAGE_MAX, 3)
            except OSError as exc:
                self._close()
                raise ForkServerError(f"the fork server did not answer: {exc}") from exc
        reply = json.loads(message) if message else {}
        if len(fds) != 3 or "pid" not in reply:
            for fd in fds:
                os.close(fd)
            self._close()
            raise ForkServerError(f"the fork server could not fork: {reply.get('error', reply)}")
        return ForkedProcess(reply["pid"], argv, fds)

    def close(self) -> None:
        """Stop the server: it exits once its end of the socket closes (and its children
        started with ``pdeathsig`` get SIGTERM)."""
        with self._lock:
            self._close(kill=False)

    def _close(self, kill: bool = True) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            if kill:
                self._proc.kill()
            try:
                self._proc.wait(_REPLY_DEADLINE)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


#: The tests' fork server (started on first use).
FORK_SERVER = ForkServer()


# --- the server -------------------------------------------------------------------------------


def _child(request: dict[str, Any], stdout_w: int) -> None:
    """In the forked child: become the hmmd the request asks for; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if request["pdeathsig"]:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        log = os.open(
            request["log"],
            os.O_WRONLY | os.O_CREAT | (os.O_APPEND if request["append"] else os.O_TRUNC),
            0o644,
        )
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(stdout_w, 1)
        os.dup2(log, 2)
        os.closerange(3, 1 << 20)  # the server's socket, other children's pipes
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        from hmmirror.daemon import __main__ as hmmd

        sys.argv = [hmmd.__file__ or "hmmd", *request["args"]]
        code = hmmd.main(request["args"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(sock: socket.socket) -> None:
    """Fork an hmmd per request until the caller's end closes; report each exit status."""
    for name in PRELOADED:
        importlib.import_module(name)

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    status_of: dict[int, int] = {}  # child pid -> the write end of its status pipe

    def reap() -> None:
        while status_of:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            fd = status_of.pop(pid, None)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.write(fd, str(os.waitstatus_to_exitcode(status)).encode())
                os.close(fd)

    while True:
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            reap()
        if sock.fileno() not in ready:
            continue
        try:
            message = sock.recv(_MESSAGE_MAX)
        except InterruptedError:
            continue
        if not message:
            return  # the caller is gone: so are we (children with pdeathsig follow)
        try:
            request = json.loads(message)
            stdout_r, stdout_w = os.pipe()
            status_r, status_w = os.pipe()
            pid = os.fork()
        except Exception as exc:  # say why; the caller falls back
            sock.send(json.dumps({"error": repr(exc)}).encode())
            continue
        if pid == 0:
            _child(request, stdout_w)
        os.close(stdout_w)
        status_of[pid] = status_w
        pidfd = os.pidfd_open(pid)  # before any reap: it names this child, even as a zombie
        try:
            socket.send_fds(sock, [json.dumps({"pid": pid}).encode()], [stdout_r, status_r, pidfd])
        finally:
            for fd in (stdout_r, status_r, pidfd):
                os.close(fd)
        reap()


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
