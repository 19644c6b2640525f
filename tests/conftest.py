"""Shared fixtures: a real hmmd process, puppet targets, agent sessions, hugetlb pages.

hmmd under test is a real process running ``hmmd run`` on a short ``ipc://`` path,
started by the one launcher (:mod:`hmmirror.testing.hmmd`); readiness is its ``hmmd
ready <endpoint>`` line, never a sleep. The launcher forks it from a server that imported
hmmd once (:mod:`hmmirror.testing.forkserver`: half a second less per test on 2 vCPUs);
``HMMIRROR_TEST_FORKSERVER=0`` starts each with ``python -m hmmirror.daemon`` instead.
Every fixture wait has a deadline (:data:`FIXTURE_DEADLINE`), checked to stay
below the pytest-timeout of the test so a hang fails in the fixture, with the
daemon's stderr, rather than in the timeout thread.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hmmirror.testing.forkserver import FORK_SERVER
from hmmirror.testing.hmmd import HmmdProcess, HmmdStartError, launch_hmmd
from hmmirror.testing.puppet import Puppet

FORK_SERVER.enabled = os.environ.get("HMMIRROR_TEST_FORKSERVER", "1") != "0"

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


#: The test's hmmd, started but not yet ready, for the ``puppet`` fixture to wait for.
STARTING_HMMD = pytest.StashKey["Hmmd"]()


@dataclass
class Hmmd:
    """A running hmmd (started by :func:`hmmirror.testing.hmmd.start_hmmd`) and its directory."""

    launched: HmmdProcess
    directory: str
    killed_by_test: bool = False
    """Set by a test that kills hmmd on purpose: its exit status is then not a failure."""

    def wait_ready(self) -> None:
        """Wait for the ready line (once), within the fixture's deadline; fail the test if
        hmmd exits or prints none. The fixture leaves the wait to the ``puppet`` fixture
        when a test takes both, so that the two processes start at once; whatever a test
        uses of hmmd waits for it first."""
        if self.launched.ready:
            return
        try:
            self.launched.wait_ready(FIXTURE_DEADLINE)
        except HmmdStartError as e:
            pytest.fail(str(e), pytrace=False)

    @property
    def endpoint(self) -> str:
        """The endpoint hmmd bound (from its ready line)."""
        self.wait_ready()
        return self.launched.endpoint

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """hmmd's process."""
        self.wait_ready()
        return self.launched.proc

    @property
    def stderr_path(self) -> str:
        """Where hmmd's stderr goes."""
        return self.launched.log_path

    @property
    def stdout_lines(self) -> list[str]:
        """Everything hmmd printed on stdout, the ready line first."""
        self.wait_ready()
        return self.launched.stdout_lines

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal hmmd as a fault-injection test does (SIGKILL marks the death expected)."""
        self.wait_ready()
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.killed_by_test = True
        os.kill(self.proc.pid, sig)

    def stderr(self) -> str:
        """Everything hmmd logged so far."""
        return self.launched.log()


@pytest.fixture
def hmmd(request: pytest.FixtureRequest) -> Iterator[Hmmd]:
    """Start a real hmmd on a short ipc path; SIGTERM (then SIGKILL) it afterwards."""
    _check_deadlines(request)
    # A short directory under /tmp: sun_path holds only 107 bytes.
    directory = tempfile.mkdtemp(prefix="hmmt-", dir="/tmp")
    endpoint = f"ipc://{directory}/hmmd.sock"
    args = ["--ack-deadline", "1s", "--heartbeat", "200ms"]
    marker = request.node.get_closest_marker("hmmd_args")
    if marker is not None:
        args.extend(str(a) for a in marker.args)
    if "hmmd_extra_args" in request.fixturenames:  # arguments a test computes (file paths)
        args.extend(str(a) for a in request.getfixturevalue("hmmd_extra_args"))
    if "hmmd_group" in request.fixturenames:  # other users reach the socket through a group
        os.chmod(directory, 0o755)
        args.extend(["--socket-group", request.getfixturevalue("hmmd_group")])
    # pdeathsig: no hmmd outlives a killed pytest (started from the main thread).
    launched = launch_hmmd(
        endpoint, args, log_path=os.path.join(directory, "hmmd.stderr"), pdeathsig=True
    )
    daemon = Hmmd(launched, directory)
    try:
        if "puppet" in request.fixturenames:
            request.node.stash[STARTING_HMMD] = daemon  # the puppet fixture waits for it
        else:
            daemon.wait_ready()
        yield daemon
    finally:
        rc, killed = launched.stop(TERM_GRACE)
        failed = _test_failed(request)
        if failed or killed or rc != 0:
            sys.stderr.write(
                f"\n--- hmmd stderr ({' '.join(launched.argv)}; exit {rc}"
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


@pytest.fixture
async def puppet(request: pytest.FixtureRequest) -> AsyncIterator[Puppet]:
    """A spawned puppet target process; killed (with its children) afterwards."""
    _check_deadlines(request)
    async with Puppet.spawn(timeout=FIXTURE_DEADLINE) as p:
        started = request.node.stash.get(STARTING_HMMD, None)
        if started is not None:  # hmmd, started just before: ready before the test begins
            await asyncio.to_thread(started.wait_ready)
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
