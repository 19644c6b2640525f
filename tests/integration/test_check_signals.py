"""A checker that is stopped (SIGTERM) or killed (SIGKILL) leaves none of its processes behind.

``hmmctl check`` starts hmmd, a target and agents. SIGTERM stops the run as Ctrl-C does
(children stopped and reaped, exit 143, one line on stderr); SIGKILL cannot be caught, so
every child is started with PR_SET_PDEATHSIG. Before both, a killed check left its hmmd
(and its target and agents) running.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from hmmirror.testing.proctree import Ident, descendants, still_running

HMMCTL = [sys.executable, "-m", "hmmirror.tools.ctlapp"]


def _log_dir(children: list[Ident]) -> str | None:
    """The log directory of the check these processes belong to (named in its hmmd's
    ``--endpoint ipc://DIR/hmmd.sock``): a stopped or killed check keeps it, and these
    tests remove it so as to leave nothing in /tmp."""
    for pid, _ in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace")
        except OSError:
            continue
        found = re.search(r"ipc://(/tmp/hmmchk-[^/\x00]+)/", argv)
        if found:
            return found.group(1)
    return None


@pytest.fixture
def logs_removed() -> Iterator[list[str | None]]:
    """Log directories (``_log_dir``) to remove once the test is over."""
    dirs: list[str | None] = []
    yield dirs
    for d in dirs:
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)


def _left(children: list[Ident], within: float) -> list[int]:
    """The children still running after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        alive = still_running(children)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _started_check() -> tuple[subprocess.Popen[str], list[Ident]]:
    """A check running its rounds, and its processes (hmmd, the target, two agents)."""
    proc = subprocess.Popen(
        [*HMMCTL, "check", "--seed", "11", "--agents", "2", "--duration", "300", "--ops",
         "10000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("started hmmd"):
            break
    else:
        with proc:
            _, err = proc.communicate(timeout=10)
        pytest.fail(f"the check never started: {err[-1500:]}")
    children = descendants(proc.pid)
    assert len(children) >= 4, f"hmmd, a target and two agents, found {children}"
    return proc, children


@pytest.mark.timeout(120)
def test_sigterm_stops_the_check_and_every_process_it_started(
    logs_removed: list[str | None],
) -> None:
    proc, children = _started_check()
    logs_removed.append(_log_dir(children))
    with proc:  # its pipes are closed in the end
        time.sleep(1.0)  # inside the rounds
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-1500:])
    assert "stopped by SIGTERM" in err, err[-1500:]
    assert "Traceback" not in err, err[-1500:]
    assert _left(children, 1.0) == [], "the check exited and left these running"


@pytest.mark.timeout(120)
def test_sigkill_takes_every_process_the_check_started_with_it(
    logs_removed: list[str | None],
) -> None:
    proc, children = _started_check()
    logs_removed.append(_log_dir(children))
    with proc:
        proc.kill()
    left = _left(children, 15.0)
    for pid in left:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert left == [], "a killed check left these running"


@pytest.mark.timeout(120)
def test_sigterm_during_the_demos_check_says_so_in_one_line(
    logs_removed: list[str | None],
) -> None:
    """The demo runs the checker last: SIGTERM there ends it as it ends ``hmmctl check``
    (it printed a CancelledError traceback when SIGTERM began to cancel the run)."""
    with subprocess.Popen(
        [*HMMCTL, "demo", "--duration", "2", "--check-duration", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("started hmmd"):  # the checker's own hmmd
                break
        logs_removed.append(_log_dir(descendants(proc.pid)))
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-1500:])
    assert "hmmctl demo: stopped by SIGTERM" in err, err[-1500:]
    assert "Traceback" not in err, err[-1500:]
