"""The tests' fork server answers as ``subprocess.Popen`` does for the hmmds it forks.

Most tests take their hmmd from it (``hmmirror.testing.forkserver``): an exit status, a
signal, the ready line, the caller's environment and a log of its own must all come out
as they do for an hmmd started with ``python -m hmmirror.daemon``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from hmmirror.testing.forkserver import FORK_SERVER
from hmmirror.testing.hmmd import HmmdStartError, launch_hmmd


@pytest.fixture(autouse=True)
def _forked() -> None:
    if not FORK_SERVER.enabled:
        pytest.skip("HMMIRROR_TEST_FORKSERVER=0: this run starts every hmmd with exec")


def test_a_forked_hmmd_is_ready_stops_on_sigterm_and_dies_on_sigkill(tmp_path: Path) -> None:
    first = launch_hmmd(f"ipc://{tmp_path}/a.sock", log_path=str(tmp_path / "a.log"))
    assert first.wait_ready(10) == f"hmmd ready ipc://{tmp_path}/a.sock"
    assert os.readlink(f"/proc/{first.pid}/cwd") == os.getcwd()
    assert first.stop(5) == (0, False)
    assert "hmmd ready on" in (tmp_path / "a.log").read_text()
    second = launch_hmmd(f"ipc://{tmp_path}/b.sock", log_path=str(tmp_path / "b.log"))
    second.wait_ready(10)
    second.proc.send_signal(signal.SIGKILL)
    assert second.proc.wait(5) == -signal.SIGKILL
    assert second.proc.poll() == -signal.SIGKILL
    assert second.stop(5) == (-signal.SIGKILL, False)


def test_a_forked_hmmd_refusing_its_arguments_exits_2_with_its_line(tmp_path: Path) -> None:
    bad = launch_hmmd(
        f"ipc://{tmp_path}/c.sock", ["--heartbeat", "forever"], log_path=str(tmp_path / "c.log")
    )
    with pytest.raises(HmmdStartError, match="exited with 2"):
        bad.wait_ready(10)
    assert "heartbeat" in (tmp_path / "c.log").read_text()
    assert bad.stop(5) == (2, False)


def test_a_forked_hmmd_takes_the_callers_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HMMIRROR_HEARTBEAT", "not-a-duration")
    bad = launch_hmmd(f"ipc://{tmp_path}/d.sock", log_path=str(tmp_path / "d.log"))
    with pytest.raises(HmmdStartError, match="exited with 2"):
        bad.wait_ready(10)
    assert "HMMIRROR_HEARTBEAT" in (tmp_path / "d.log").read_text()
    assert bad.stop(5) == (2, False)
