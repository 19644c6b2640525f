"""Shared fixtures: a real hmmd process, puppet targets, agent sessions, hugetlb pages.

hmmd under test is a real process (``python -m hmmirror.daemon run``) on a short
``ipc://`` path; readiness is its ``hmmd ready <endpoint>`` line, never a sleep.
Every fixture wait has a deadline (:data:`FIXTURE_DEADLINE`), checked to stay
below the pytest-timeout of the test so a hang fails in the fixture, with the
daemon's stderr, rather than in the timeout thread.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hmmirror.testing.puppet import Puppet

#: Deadline of every fixture wait (daemon start, puppet start), in seconds.
FIXTURE_DEADLINE = 10.0
#: How long hmmd gets to exit after SIGTERM before SIGKILL.
TERM_GRACE = 5.0
HUGEPAGE_SIZE_FALLBACK = 2 << 20


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def _test_failed(request: pytest.FixtureRequest) -> bool:
    node = request.node
    return any(
        getattr(getattr(node, f"rep_{when}", None), "failed", False) for when in ("setup", "call")
    )


def _pytest_timeout(request: pytest.FixtureRequest) -> float | None:
    """The pytest-timeout that applies to this test: marker > --timeout > ini."""
    marker = request.node.get_closest_marker("timeout")
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("timeout")
    else:
        value = request.config.getoption("timeout", None)
        if value is None:
            value = request.config.getini("timeout")
    if value in (None, ""):
        return None
    return float(value)


def _check_deadlines(request: pytest.FixtureRequest) -> None:
    """Refuse to run without a pytest timeout, or with one shorter than our own deadlines."""
    timeout = _pytest_timeout(request)
    if not timeout:
        pytest.fail("these tests need pytest-timeout; timeout=None/0 is refused", pytrace=False)
    need = FIXTURE_DEADLINE + TERM_GRACE
    if timeout <= need:
        pytest.fail(
            f"pytest timeout {timeout} s must exceed the fixture deadlines ({need} s)",
            pytrace=False,
        )


@dataclass
class Hmmd:
    """A running hmmd: its bound endpoint, its process and where its stderr goes."""

    endpoint: str
    proc: subprocess.Popen[bytes]
    directory: str
    stderr_path: str
    stdout_lines: list[str] = field(default_factory=list)
    killed_by_test: bool = False
    """Set by a test that kills hmmd on purpose: its exit status is then not a failure."""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal hmmd as a fault-injection test does (SIGKILL marks the death expected)."""
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.killed_by_test = True
        os.kill(self.proc.pid, sig)

    def stderr(self) -> str:
        """Everything hmmd logged so far."""
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except OSError as e:
            return f"<cannot read {self.stderr_path}: {e}>"


def _read_ready_line(proc: subprocess.Popen[bytes], deadline: float) -> str:
    """Read hmmd's stdout until the ``hmmd ready`` line, the process's death, or the deadline."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"hmmd printed no 'hmmd ready' line in {FIXTURE_DEADLINE} s")
            if not sel.select(remaining):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                rc = proc.wait(timeout=FIXTURE_DEADLINE)
                raise RuntimeError(f"hmmd exited with {rc} before it was ready; stdout: {buf!r}")
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith("hmmd ready "):
                    return line
    finally:
        sel.close()


def _die_with_parent() -> None:
    """In the daemon child: get SIGTERM if pytest dies, so no hmmd outlives a killed run."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _drain(proc: subprocess.Popen[bytes], sink: list[str]) -> None:
    """Keep reading hmmd's stdout so a chatty daemon never blocks on a full pipe."""
    assert proc.stdout is not None
    for raw in proc.stdout:
        sink.append(raw.decode(errors="replace").rstrip("\n"))


@pytest.fixture
def hmmd(request: pytest.FixtureRequest) -> Iterator[Hmmd]:
    """Start a real hmmd on a short ipc path; SIGTERM (then SIGKILL) it afterwards."""
    _check_deadlines(request)
    # A short directory under /tmp: sun_path holds only 107 bytes.
    directory = tempfile.mkdtemp(prefix="hmmt-", dir="/tmp")
    endpoint = f"ipc://{directory}/hmmd.sock"
    stderr_path = os.path.join(directory, "hmmd.stderr")
    argv = [
        sys.executable,
        "-m",
        "hmmirror.daemon",
        "run",
        "--endpoint",
        endpoint,
        "--ack-deadline",
        "1s",
        "--heartbeat",
        "200ms",
    ]
    marker = request.node.get_closest_marker("hmmd_args")
    if marker is not None:
        argv.extend(str(a) for a in marker.args)
    if "hmmd_extra_args" in request.fixturenames:  # arguments a test computes (file paths)
        argv.extend(str(a) for a in request.getfixturevalue("hmmd_extra_args"))
    if "hmmd_group" in request.fixturenames:  # other users reach the socket through a group
        os.chmod(directory, 0o755)
        argv.extend(["--socket-group", request.getfixturevalue("hmmd_group")])
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            preexec_fn=_die_with_parent,
        )
    daemon = Hmmd(endpoint, proc, directory, stderr_path)
    drainer: threading.Thread | None = None
    try:
        try:
            line = _read_ready_line(proc, time.monotonic() + FIXTURE_DEADLINE)
        except (TimeoutError, RuntimeError) as e:
            pytest.fail(f"{e}\n--- hmmd stderr ---\n{daemon.stderr()}", pytrace=False)
        daemon.stdout_lines.append(line)
        daemon.endpoint = line.split(maxsplit=2)[2].strip()
        drainer = threading.Thread(
            target=_drain, args=(proc, daemon.stdout_lines), name="hmmd-stdout", daemon=True
        )
        drainer.start()
        yield daemon
    finally:
        rc, killed = _stop(proc)
        if drainer is not None:
            drainer.join(TERM_GRACE)
        if proc.stdout is not None:
            proc.stdout.close()
        failed = _test_failed(request)
        if failed or killed or rc != 0:
            sys.stderr.write(
                f"\n--- hmmd stderr ({' '.join(argv)}; exit {rc}"
                f"{', SIGKILLed after SIGTERM timeout' if killed else ''}) ---\n"
                f"{daemon.stderr()}--- end hmmd stderr ---\n"
            )
        shutil.rmtree(directory, ignore_errors=True)
    if daemon.killed_by_test:
        return
    if killed:
        pytest.fail(f"hmmd ignored SIGTERM for {TERM_GRACE} s and was killed", pytrace=False)
    if rc != 0:
        pytest.fail(f"hmmd exited with {rc} on SIGTERM (expected a clean 0)", pytrace=False)


def _stop(proc: subprocess.Popen[bytes]) -> tuple[int, bool]:
    """SIGTERM, wait up to TERM_GRACE, then SIGKILL; return (returncode, killed)."""
    if proc.poll() is not None:
        return proc.returncode, False
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=TERM_GRACE), False
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=FIXTURE_DEADLINE), True


@pytest.fixture
async def puppet(request: pytest.FixtureRequest) -> AsyncIterator[Puppet]:
    """A spawned puppet target process; killed (with its children) afterwards."""
    _check_deadlines(request)
    async with Puppet.spawn(timeout=FIXTURE_DEADLINE) as p:
        yield p


@pytest.fixture
def agent(hmmd: Hmmd) -> Callable[..., Any]:
    """A factory of agent sessions on the test's hmmd.

    ``async with agent() as s`` is ``hmmirror.client.connect(hmmd.endpoint, name=...)``
    with a unique name; two sessions are two devices (``hmm2``).
    """
    from hmmirror.client import connect

    counter = itertools.count()

    def make(name: str | None = None, **kwargs: Any) -> Any:
        return connect(hmmd.endpoint, name=name or f"agent-{next(counter)}", **kwargs)

    return make


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def default_hugepage_size() -> int:
    """``Hugepagesize`` from /proc/meminfo, in bytes."""
    try:
        return _meminfo("Hugepagesize") * 1024
    except (OSError, KeyError):
        return HUGEPAGE_SIZE_FALLBACK


@pytest.fixture
def hugetlb_pages() -> Iterator[Callable[[int], int]]:
    """``hugetlb_pages(n)`` makes sure ``n`` default-size hugetlb pages are free.

    It returns the default hugetlb page size in bytes. It raises
    ``/proc/sys/vm/nr_hugepages`` as needed and restores the old value afterwards;
    if the kernel cannot provide the pages it skips, saying why.
    """
    path = "/proc/sys/vm/nr_hugepages"
    saved: list[int] = []

    def reserve(n: int) -> int:
        with open(path) as f:
            old = int(f.read())
        free = _meminfo("HugePages_Free")
        if free >= n:
            return default_hugepage_size()
        want = old + (n - free)
        if not saved:
            saved.append(old)
        try:
            with open(path, "w") as f:
                f.write(f"{want}\n")
        except OSError as e:
            pytest.skip(f"cannot raise {path} from {old} to {want}: {e}")
        with open(path) as f:
            got = int(f.read())
        free = _meminfo("HugePages_Free")
        if free < n:
            pytest.skip(
                f"asked the kernel for {want} hugetlb pages ({path}), it gave {got}; "
                f"HugePages_Free={free} < {n} needed (memory too fragmented or too small)"
            )
        return default_hugepage_size()

    yield reserve
    if saved:
        with open(path, "w") as f:
            f.write(f"{saved[0]}\n")


@pytest.fixture
def hold_dma() -> Callable[[Any], tuple[Any, Any]]:
    """``hold_dma(mirror)``: that mirror's next DMA stays in flight until released.

    Returns (entered, release) asyncio Events. A DMA in flight fences the ACK of
    any invalidation of its pages, so this is how a test makes an agent's ack
    late, or never come.
    """
    import asyncio

    def hold(mirror: Any) -> tuple[asyncio.Event, asyncio.Event]:
        entered, release = asyncio.Event(), asyncio.Event()

        async def hook() -> None:
            mirror.dma_hook = None
            entered.set()
            await release.wait()

        mirror.dma_hook = hook
        return entered, release

    return hold
