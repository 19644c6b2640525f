"""The one hmmd launcher: the tests' fixtures, the demo, the checker and the benchmarks use it.

:func:`start_hmmd` runs ``python -m hmmirror.daemon run --endpoint ENDPOINT ARGS...``
with its stderr in a log file, reads its stdout until the ``hmmd ready <endpoint>``
line (never a sleep) within a deadline, and returns a :class:`HmmdProcess` whose
``endpoint`` is the one hmmd bound (``tcp://...:0`` becomes a real port). After the
ready line a thread keeps reading stdout, so a chatty daemon never blocks on a
full pipe. :meth:`HmmdProcess.stop` is SIGTERM, a grace period, then SIGKILL.

Callers that run hmmd elsewhere (in a network namespace, under the bench's
process reaper) pass their own ``spawn``, called like :class:`subprocess.Popen`.
Async callers use :func:`start_hmmd_async`: the process starts on the loop's
thread, the wait for the ready line runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypedDict, Unpack, cast

from hmmirror.testing import forkserver

__all__ = [
    "READY_PREFIX",
    "START_DEADLINE",
    "STOP_GRACE",
    "HmmdProcess",
    "HmmdStartError",
    "LaunchOptions",
    "hmmd_argv",
    "launch_hmmd",
    "start_hmmd",
    "start_hmmd_async",
]

#: The line hmmd prints on stdout once its socket is bound, before the endpoint.
READY_PREFIX = "hmmd ready "
#: Default deadline for the ready line, in seconds.
START_DEADLINE = 10.0
#: Default time hmmd gets to exit after SIGTERM before SIGKILL, in seconds.
STOP_GRACE = 5.0

#: How a process is started: called as ``spawn(argv, stdin=, stdout=, stderr=, env=)``.
Spawn = Callable[..., subprocess.Popen[bytes]]


class HmmdStartError(RuntimeError):
    """hmmd exited, or printed no ready line, before its deadline; the message has its log."""


def hmmd_argv(endpoint: str, args: Sequence[str] = (), python: Sequence[str] = ()) -> list[str]:
    """``python [PYTHON...] -m hmmirror.daemon run --endpoint ENDPOINT [ARGS...]``.

    ``python`` holds interpreter options placed before ``-m`` (``-m cProfile -o F``).
    """
    return [
        sys.executable, *python, "-m", "hmmirror.daemon", "run", "--endpoint", endpoint, *args
    ]  # fmt: skip


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the thread that started it dies.

    PR_SET_PDEATHSIG follows the parent *thread*, so only callers that start hmmd
    from a long-lived thread (the main one) should ask for it.
    """
    pr_set_pdeathsig = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class HmmdProcess:
    """A started hmmd: its process, the endpoint it bound, its log and its stdout lines."""

    def __init__(
        self, proc: subprocess.Popen[bytes], argv: list[str], endpoint: str, log_path: str
    ):
        self.proc = proc
        self.argv = argv
        #: The endpoint asked for until the ready line says which one was bound.
        self.endpoint = endpoint
        self.log_path = log_path
        self.stdout_lines: list[str] = []
        self._drainer: threading.Thread | None = None

    @property
    def pid(self) -> int:
        """hmmd's pid."""
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """Its exit status once it exited (``-signal`` if killed), else None."""
        return self.proc.poll()

    # --- readiness -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether its ready line came (``wait_ready`` returned)."""
        return self._drainer is not None

    def wait_ready(self, deadline: float = START_DEADLINE) -> str:
        """Read stdout until the ready line; set ``endpoint`` from it and return it.

        Raises :class:`HmmdStartError` (with the log's tail) if hmmd exits first or
        ``deadline`` seconds pass; hmmd is killed in that case.
        """
        try:
            line = self._read_ready_line(time.monotonic() + deadline, deadline)
        except HmmdStartError as exc:
            self.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop(STOP_GRACE)
            raise HmmdStartError(
                f"hmmd did not start: {exc}\n--- hmmd log ---\n{self.log_tail()}"
            ) from None
        self.endpoint = line[len(READY_PREFIX) :].strip()
        self._drainer = threading.Thread(target=self._drain, name="hmmd-stdout", daemon=True)
        self._drainer.start()
        return line

    def _read_ready_line(self, until: float, deadline: float) -> str:
        """Lines of stdout, kept in ``stdout_lines``, up to the first ready line."""
        out = self.proc.stdout
        assert out is not None, "hmmd must be started with stdout=PIPE"
        sel = selectors.DefaultSelector()
        sel.register(out, selectors.EVENT_READ)
        buf = b""
        try:
            while True:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    raise HmmdStartError(f"hmmd printed no 'hmmd ready' line in {deadline:g} s")
                if not sel.select(remaining):
                    continue
                # os.read, not the buffered file: the drain thread reads what follows.
                chunk = os.read(out.fileno(), 4096)
                if not chunk:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(STOP_GRACE)
                    raise HmmdStartError(
                        f"hmmd exited with {self.proc.returncode} before it was ready; "
                        f"stdout: {buf!r}"
                    )
                buf += chunk
                *lines, rest = buf.split(b"\n")
                buf = rest
                for i, raw in enumerate(lines):
                    text = raw.decode(errors="replace")
                    self.stdout_lines.append(text)
                    if text.startswith(READY_PREFIX):
                        # Complete lines only; the drain thread reads the rest from the pipe.
                        self.stdout_lines.extend(
                            t.decode(errors="replace") for t in lines[i + 1 :] if t
                        )
                        return text
        finally:
            sel.close()

    def _drain(self) -> None:
        """Keep reading stdout (into ``stdout_lines``) so hmmd never blocks on the pipe."""
        out = self.proc.stdout
        assert out is not None
        with contextlib.suppress(OSError, ValueError):
            for raw in out:
                self.stdout_lines.append(raw.decode(errors="replace").rstrip("\n"))

    # --- signals and stopping ----------------------------------------------------------------

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to hmmd if it still runs."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for hmmd to exit; its return code (``subprocess.TimeoutExpired`` past it)."""
        return self.proc.wait(timeout)

    def stop(self, grace: float = STOP_GRACE) -> tuple[int, bool]:
        """SIGTERM, wait up to ``grace`` s, then SIGKILL; return (returncode, was SIGKILLed).

        Also joins the stdout thread and closes the pipe.
        """
        killed = False
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait(max(grace, START_DEADLINE))
                killed = True
        if self._drainer is not None:
            self._drainer.join(grace)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        return self.proc.returncode, killed

    async def stop_async(self, grace: float = STOP_GRACE) -> tuple[int, bool]:
        """:meth:`stop` from a coroutine, without blocking the loop."""
        return await asyncio.to_thread(self.stop, grace)

    # --- the log -------------------------------------------------------------------------------

    def log(self) -> str:
        """Everything hmmd logged (its stderr) so far."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError as e:
            return f"<cannot read {self.log_path}: {e}>"

    def log_tail(self, n: int = 30) -> str:
        """The last ``n`` lines of the log."""
        return "".join(self.log().splitlines(keepends=True)[-n:])

    def problems(self) -> str:
        """A one-line summary of the warning, error and Traceback lines in the log ('' if
        none): ``TIMESTAMP level logger: ...`` lines (``daemon.logfmt``'s text format)."""
        bad = [
            ln.strip()
            for ln in self.log().splitlines()
            if ln.startswith("Traceback") or _level(ln) in _BAD_LEVELS
        ]
        if not bad:
            return ""
        return f"hmmd logged {len(bad)} warning/error lines, first: {bad[0][:200]!r}"


#: The levels ``problems`` reports.
_BAD_LEVELS = frozenset(("warning", "error", "critical"))


def _level(line: str) -> str:
    """The level of a ``TIMESTAMP level logger: message`` log line ('' for another line)."""
    words = line.split(" ", 2)
    return words[1] if len(words) > 1 else ""


class LaunchOptions(TypedDict, total=False):
    """How hmmd is started, past its endpoint, arguments and log: the keyword arguments
    :func:`launch_hmmd`, :func:`start_hmmd` and :func:`start_hmmd_async` share, all optional."""

    append: bool
    """Keep what the log holds (a restart) rather than truncate it; False by default."""
    env: Mapping[str, str] | None
    """The whole environment of hmmd; None (the default) inherits this one."""
    spawn: Spawn | None
    """A Popen-like starter (a network namespace's, the bench's reaper's); None: Popen."""
    python: Sequence[str]
    """Interpreter options before ``-m`` (``-m cProfile -o FILE``); none by default."""
    pdeathsig: bool
    """SIGTERM hmmd when the thread that started it dies (the default starter only)."""


def launch_hmmd(
    endpoint: str, args: Sequence[str] = (), *, log_path: str, **opts: Unpack[LaunchOptions]
) -> HmmdProcess:
    """Start hmmd without waiting for it (see :func:`start_hmmd` for the arguments)."""
    argv = hmmd_argv(endpoint, args, opts.get("python", ()))
    given_env, spawn = opts.get("env"), opts.get("spawn")
    env = None if given_env is None else dict(given_env)
    mode = "ab" if opts.get("append", False) else "wb"
    if spawn is None and not opts.get("python") and forkserver.FORK_SERVER.enabled:
        forked = forkserver.FORK_SERVER.spawn(
            argv, argv[3:], log_path, opts.get("append", False), opts.get("pdeathsig", False), env
        )
        return HmmdProcess(cast(subprocess.Popen[bytes], forked), argv, endpoint, log_path)
    with open(log_path, mode) as log:  # the child keeps its own copy
        if spawn is not None:
            proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                         env=env)  # fmt: skip
        else:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env,
                preexec_fn=die_with_parent if opts.get("pdeathsig", False) else None,
            )  # fmt: skip
    return HmmdProcess(proc, argv, endpoint, log_path)


def start_hmmd(
    endpoint: str,
    args: Sequence[str] = (),
    *,
    log_path: str,
    deadline: float = START_DEADLINE,
    **opts: Unpack[LaunchOptions],
) -> HmmdProcess:
    """Start hmmd on ``endpoint`` and return it once its ready line came.

    Parameters
    ----------
    endpoint, args
        ``--endpoint`` and the further ``hmmd run`` arguments.
    log_path
        Where hmmd's stderr goes.
    deadline
        Seconds allowed for the ready line; :class:`HmmdStartError` after them.
    **opts
        How it is started: :class:`LaunchOptions` (``append``, ``env``, ``spawn``,
        ``python``, ``pdeathsig``).
    """
    hmmd = launch_hmmd(endpoint, args, log_path=log_path, **opts)
    hmmd.wait_ready(deadline)
    return hmmd


async def start_hmmd_async(
    endpoint: str,
    args: Sequence[str] = (),
    *,
    log_path: str,
    deadline: float = START_DEADLINE,
    **opts: Unpack[LaunchOptions],
) -> HmmdProcess:
    """:func:`start_hmmd` for coroutines: the wait for the ready line runs in a thread."""
    hmmd = launch_hmmd(endpoint, args, log_path=log_path, **opts)
    try:
        await asyncio.to_thread(hmmd.wait_ready, deadline)
    except BaseException:
        hmmd.kill()  # cancelled while waiting: leave no hmmd behind
        raise
    return hmmd
