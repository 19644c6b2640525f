"""Shared plumbing for the hmmirror benchmarks (not tests).

* ``Procs``: spawn helper processes and kill every one of them (by pid) on exit.
* ``spawn_target`` / ``target_main``: a tiny target process that mmaps an anonymous
  region, optionally writes every page, prints ``target ready <addr> <len>`` and sleeps
  until its stdin closes (or a hard time limit).
* ``start_daemon``: run ``hmmd`` and wait for ``hmmd ready`` (``hmmirror.testing.hmmd``).
* ``daemon_request`` / ``daemon_status``: one raw request that needs no session (Status, Inventory).
* ``agent_args`` / ``run_modes``: the command lines of the helper scripts (agents, targets).
* ``StdinLines``: a helper process's commands on stdin, read on its event loop.
* ``machine_info``, ``Row`` and ``print_table`` for the report; ``is_server`` and
  ``SERVER_CPUS``: whether a row's 16-core goal (bench/README.md) applies to this machine.

Run as a script, this file is the target: ``python bench/common.py target NBYTES [--populate]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import mmap
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from hmmirror.testing.hmmd import HmmdProcess, start_hmmd

PY = sys.executable
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PAGE = 4096

#: Hard cap on how long any helper process lives, whatever happens to its parent.
HELPER_MAX_S = 600.0


# --------------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the bench process dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class Procs:
    """Context manager owning helper processes; every one is terminated, then killed, on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Procs:
        return self

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdout: Any = subprocess.PIPE,
        stdin: Any = subprocess.PIPE,
        stderr: Any = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            list(argv),
            stdout=stdout,
            stdin=stdin,
            stderr=stderr,
            env=env,
            cwd=REPO,
            preexec_fn=_die_with_parent,
        )
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 3.0) -> int | None:
        """Close stdin, SIGTERM, wait, then SIGKILL; returns the exit code."""
        if p.poll() is None:
            with contextlib.suppress(Exception):
                if p.stdin:
                    p.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout)
        for f in (p.stdin, p.stdout):
            with contextlib.suppress(Exception):
                if f:
                    f.close()
        return p.returncode

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.procs):
            self.stop(p)
        self.procs.clear()


def read_line(p: subprocess.Popen[bytes], prefix: str, timeout: float) -> str:
    """Read stdout lines of ``p`` until one starts with ``prefix``; raise on timeout or exit."""
    return read_until(p, prefix, timeout)[-1]


def read_until(p: subprocess.Popen[bytes], prefix: str, timeout: float) -> list[str]:
    """Every stdout line of ``p`` up to and including the first starting with ``prefix``.

    Reads byte by byte past nothing: whatever follows that line stays in the pipe
    for the next call.
    """
    assert p.stdout is not None
    fd = p.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    seen: list[str] = []
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], max(0.0, min(0.2, deadline - time.monotonic())))
        if r:
            chunk = os.read(fd, 1)  # one byte: never swallow the lines after ours
            if not chunk:
                raise RuntimeError(
                    f"process {p.args!r} closed stdout (rc={p.poll()}); saw {seen!r}"
                )
            buf += chunk
            if chunk == b"\n":
                text = buf.decode(errors="replace").strip()
                buf = b""
                seen.append(text)
                if text.startswith(prefix):
                    return seen
        elif p.poll() is not None:
            raise RuntimeError(
                f"process {p.args!r} exited rc={p.returncode} before {prefix!r}; saw {seen!r}"
            )
    raise TimeoutError(f"no {prefix!r} from {p.args!r} within {timeout}s; saw {seen!r}")


def agent_args(argv: Sequence[str]) -> tuple[str, str, int, int, int]:
    """An agent script's ``ENDPOINT NAME PID START LENGTH`` (START in hex, as the rigs pass it)."""
    return argv[0], argv[1], int(argv[2]), int(argv[3], 0), int(argv[4])


def run_modes(modes: Mapping[str, Callable[[list[str]], int]], usage: str) -> NoReturn:
    """A helper script's ``__main__``: ``python FILE MODE ARGS...`` exits with what
    ``modes[MODE](ARGS)`` returns; any other command line prints ``usage`` and exits 2."""
    if len(sys.argv) >= 2 and sys.argv[1] in modes:
        sys.exit(modes[sys.argv[1]](sys.argv[2:]))
    print(f"usage: {usage}", file=sys.stderr)
    sys.exit(2)


class StdinLines:
    """This process's stdin, read on the event loop: the lines it brings, and when it closes.

    A helper process takes its commands one a line, and stops when the bench closes its stdin.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: Set once stdin closed (or could not be read).
        self.closed = asyncio.Event()
        #: Each line as it comes, without its newline; then "" once stdin closed.
        self.lines: asyncio.Queue[str] = asyncio.Queue()
        self._buf = b""
        loop.add_reader(0, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(0, 4096)
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(0)
            self.closed.set()
            self.lines.put_nowait("")
            return
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            self.lines.put_nowait(line.decode())


@contextlib.contextmanager
def tmpdir() -> Iterator[str]:
    """A short directory under /tmp for ipc:// sockets (sun_path is limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="hmmb-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- target


@dataclass
class BenchTarget:
    """A target process started by :func:`spawn_target` and the arena it mapped."""

    proc: subprocess.Popen[bytes]
    pid: int
    addr: int
    length: int


def spawn_target(procs: Procs, nbytes: int, populate: bool, timeout: float = 60.0) -> BenchTarget:
    """Start the target: mmap ``nbytes`` anonymous, write every page if ``populate``."""
    argv = [PY, os.path.join(HERE, "common.py"), "target", str(nbytes)]
    if populate:
        argv.append("--populate")
    p = procs.spawn(argv)
    line = read_line(p, "target ready", timeout)
    _, _, addr, length = line.split()
    return BenchTarget(p, p.pid, int(addr, 16), int(length))


def target_main(argv: list[str]) -> int:
    nbytes = int(argv[0])
    populate = "--populate" in argv
    m = mmap.mmap(
        -1,
        nbytes,
        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
    )
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    if populate:
        import numpy as np

        a = np.frombuffer(m, dtype=np.uint8)
        a[::PAGE] = 1  # one write per 4 KiB page: every page becomes present, writable, exclusive
        del a
    sys.stdout.write(f"target ready {addr:#x} {nbytes}\n")
    sys.stdout.flush()
    # Sleep until the parent closes our stdin (or dies), bounded by HELPER_MAX_S.
    deadline = time.monotonic() + HELPER_MAX_S
    while time.monotonic() < deadline:
        r, _, _ = select.select([0], [], [], 1.0)
        if r and not os.read(0, 4096):
            break
        if os.getppid() == 1:
            break
    return 0


# --------------------------------------------------------------------------- daemon


#: If set, every hmmd runs under cProfile and writes ``hmmd-<n>.prof`` here (diagnostics only).
PROFILE_DIR: str | None = None
_profiles = iter(range(1, 1 << 30))


def start_daemon(
    procs: Procs,
    endpoint: str,
    workdir: str,
    extra: Sequence[str] = (),
    timeout: float = 20.0,
    env: dict[str, str] | None = None,
    name: str = "hmmd",
) -> HmmdProcess:
    """Start hmmd on ``endpoint`` with the one launcher, wait for ``hmmd ready``; its stderr
    goes to ``workdir/NAME.stderr``; ``env`` adds environment variables (HMMIRROR_* settings).

    ``procs`` starts it (and stops it with the other helpers): it dies with the bench."""
    pre: list[str] = []
    if PROFILE_DIR:
        prof = os.path.join(PROFILE_DIR, f"hmmd-{next(_profiles)}.prof")
        pre = ["-m", "cProfile", "-o", prof]
    return start_hmmd(
        endpoint,
        extra,
        log_path=os.path.join(workdir, f"{name}.stderr"),
        deadline=timeout,
        env={**os.environ, **env} if env else None,
        spawn=procs.spawn,
        python=pre,
    )  # HmmdStartError, a RuntimeError, says why with hmmd's log


#: hmmd instances a benchmark may run on one host (``--soak-daemons``, ``--scaling-daemons``).
MAX_DAEMONS = 8


def hmmds(n: int) -> str:
    """The daemon count as the rows name it: nothing for one hmmd (the rows read as they always
    did), ", N hmmds" for several."""
    return f", {n} hmmds" if n > 1 else ""


def start_daemons(
    procs: Procs, workdir: str, n: int, extra: Sequence[str], log: Any, tag: str
) -> list[HmmdProcess]:
    """``n`` hmmds, their sockets in ``workdir`` (``hmmd.sock`` for one, ``hmmd-I.sock`` for
    several), so that they share ``workdir/hmmd-owners`` and each process has one owner among
    them (SPEC.md §1.7). ``procs`` stops them."""
    if not 1 <= n <= MAX_DAEMONS:
        raise ValueError(f"{n} hmmd instances: 1..{MAX_DAEMONS}")
    if n == 1:
        return [start_daemon(procs, f"ipc://{workdir}/hmmd.sock", workdir, extra)]
    daemons = [
        start_daemon(procs, f"ipc://{workdir}/hmmd-{i}.sock", workdir, extra, name=f"hmmd-{i}")
        for i in range(n)
    ]
    log(f"[{tag}] {n} hmmd instances sharing {workdir}/hmmd-owners: pids "
        f"{','.join(str(h.proc.pid) for h in daemons)}")  # fmt: skip
    return daemons


def report_problems(daemons: Sequence[HmmdProcess], log: Any) -> None:
    """Log what each hmmd's stderr says went wrong (nothing if nothing did)."""
    for i, daemon in enumerate(daemons):
        bad = daemon.problems()
        if bad:
            log(f"[hmmd{'-' + str(i) if len(daemons) > 1 else ''} log] {bad}")


def daemon_request(endpoint: str, msg: Any, reply: str, timeout: float = 5.0) -> Any:
    """One raw request that needs no session (Status, Inventory) -> the reply message."""
    import zmq
    from hmmirror.proto import decode, encode
    from hmmirror.transport import dial

    ctx = zmq.Context.instance()
    s = dial(ctx, endpoint, timeout=timeout)
    try:
        s.send_multipart(encode(msg, id=1))
        if not s.poll(int(timeout * 1000)):
            raise TimeoutError(f"no {reply} from {endpoint} in {timeout}s")
        env = decode(s.recv_multipart())
        if env.type != reply:
            raise RuntimeError(f"{type(msg).__name__} answered with {env.type}: {env.msg}")
        return env.msg
    finally:
        s.close(0)


def daemon_status(endpoint: str, timeout: float = 5.0) -> dict[str, Any]:
    """Raw Status request (no session) -> the stats dict."""
    from hmmirror.proto.messages import Status

    return dict(daemon_request(endpoint, Status(), "status_reply", timeout).stats)


# --------------------------------------------------------------------------- report


def _cpu_busy_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]) - idle, sum(v[:8])


def busy_cores(interval: float = 0.5) -> float:
    """CPU cores busy (all processes) over ``interval`` seconds, from /proc/stat."""
    b0, t0 = _cpu_busy_jiffies()
    time.sleep(interval)
    b1, t1 = _cpu_busy_jiffies()
    ncpu = os.cpu_count() or 1
    return (b1 - b0) / max(1, t1 - t0) * ncpu


def wait_idle(max_wait: float, threshold: float = 0.15, log: Any = print) -> float:
    """Wait (at most ``max_wait`` s) until the machine uses < ``threshold`` cores; return that."""
    deadline = time.monotonic() + max_wait
    t0 = time.monotonic()
    while True:
        b = busy_cores()
        if b < threshold:
            if time.monotonic() - t0 > 1.0:
                log(f"[idle] machine idle after {time.monotonic() - t0:.0f} s ({b:.2f} cores busy)")
            return b
        if time.monotonic() >= deadline:
            log(
                f"[idle] WARNING: machine still busy ({b:.2f} cores used by other work) after "
                f"{max_wait:.0f} s; measuring anyway, results are noisy"
            )
            return b


#: Seconds ``settle()`` may wait for an idle machine before each measurement (0: don't wait).
IDLE_WAIT = 30.0


def settle(log: Any = print) -> float:
    """Before a measurement: wait (bounded by IDLE_WAIT) for other work to stop."""
    return wait_idle(IDLE_WAIT, log=log) if IDLE_WAIT > 0 else busy_cores()


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machine_info() -> str:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import zmq

        zv = f"pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}"
    except Exception:
        zv = "pyzmq ?"
    try:
        import uvloop

        uv = f"uvloop {uvloop.__version__}"
    except Exception:
        uv = "no uvloop"
    return (
        f"nproc={os.cpu_count()} loadavg={loadavg()} kernel={platform.release()} cpu={cpu!r} "
        f"python={platform.python_version()} {zv} {uv}"
    )


#: Goals set for "a real server" (bench/README.md's table, 16 cores) apply from this many CPUs;
#: fewer get the 2-vCPU goals (or an info row where the table has none for them).
SERVER_CPUS = 16


def cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def is_server() -> bool:
    """Whether the server goals apply here (``SERVER_CPUS`` or more CPUs)."""
    return cpus() >= SERVER_CPUS


def soak_rate_goal() -> float:
    """The invalidating ops/s the soak's goal asks for on this machine (bench/README.md):
    30,000 on a server, 10,000 on the 2-vCPU development machines."""
    return 30_000.0 if is_server() else 10_000.0


@dataclass
class Row:
    benchmark: str
    ours: str
    baseline: str
    ratio: float | None
    target: str
    verdict: str
    note: str = ""


def verdict(ratio: float | None, op: str, bound: float) -> str:
    if ratio is None:
        return "n/a"
    ok = ratio <= bound if op == "<=" else ratio >= bound
    return "PASS" if ok else "FAIL"


def print_table(rows: Sequence[Row], file: Any = None) -> None:
    out = file or sys.stdout
    heads = ("benchmark", "ours", "baseline", "ratio", "target", "verdict")
    cells = [
        (
            r.benchmark,
            r.ours,
            r.baseline,
            "-" if r.ratio is None else f"{r.ratio:.2f}",
            r.target,
            r.verdict,
        )
        for r in rows
    ]
    widths = [
        max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)
    ]
    print(
        "| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)) + " |", file=out
    )
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for c in cells:
        print(
            "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)) + " |", file=out
        )
    notes = [f"  * {r.benchmark}: {r.note}" for r in rows if r.note]
    if notes:
        print("\n".join(notes), file=out)
    out.flush()


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, round(q / 100.0 * (len(s) - 1))))
    return s[k]


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "target":
        sys.exit(target_main(sys.argv[2:]))
    print(machine_info())


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """utime + stime of ``pid`` (all its threads, or only its thread ``thread``), in
    seconds; 0 if it is gone."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK
