"""hmmd under systemd: the notify protocol on a real socket, and the units as systemd sees them.

The notify test binds a real AF_UNIX datagram socket, starts hmmd with
``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` pointing at it, and reads what arrives.
The unit tests run Debian's ``systemd-analyze`` (systemd 252) offline.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hmmirror.testing.hmmd import launch_hmmd

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent


def test_sd_notify_ready_watchdog_and_stopping(tmp_path):
    path = str(tmp_path / "notify.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    sink.settimeout(10)
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    hmmd = launch_hmmd(f"ipc://{tmp_path}/h.sock", log_path=str(tmp_path / "hmmd.stderr"), env=env)
    try:
        first = sink.recv(4096).decode()
        assert first.startswith("READY=1\n") and "STATUS=serving on ipc://" in first, first
        hmmd.wait_ready(10)
        pings = []
        t0 = time.monotonic()
        while len(pings) < 3:
            message = sink.recv(4096).decode()
            if message == "WATCHDOG=1":
                pings.append(time.monotonic())
        assert pings[-1] - t0 < 2.0, "WATCHDOG=1 every half of WATCHDOG_USEC (100 ms)"
        hmmd.kill(signal.SIGTERM)
        while (message := sink.recv(4096).decode()) == "WATCHDOG=1":
            pass
        assert message == "STOPPING=1"
        assert hmmd.wait(10) == 0
    finally:
        hmmd.stop()
        sink.close()


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip(
            "systemd-analyze is not installed (Debian package systemd), so the units cannot be "
            "checked here; ./hmmirror test installs it when apt-get is available"
        )
    return exe


def test_units_verify_clean(tmp_path):
    exe = _systemd_analyze()
    # A root with the units installed, the real entry points where ExecStart= looks, and the
    # distribution's own units (sysinit.target and friends) that ours depend on.
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in DEPLOY.glob("*.service"):
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/local/bin").mkdir(parents=True)
    for script in ("hmmd", "hm-agent"):
        shutil.copy(VENV_BIN / script, root / "usr/local/bin" / script)
    out = subprocess.run(
        [exe, "verify", f"--root={root}", "/etc/systemd/system/hmmd.service",
         "/etc/systemd/system/hmmd@.service", "/etc/systemd/system/hm-agent@.service"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    ours = [ln for ln in (out.stdout + out.stderr).splitlines() if "hmm" in ln]
    assert ours == [], ours


def test_hmmd_unit_exposure_is_at_most_2_5():
    exe = _systemd_analyze()
    out = subprocess.run(
        [exe, "security", "--offline=true", str(DEPLOY / "hmmd.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for hmmd\.service: (\d+\.\d+)", out.stdout)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= 2.5, out.stdout
    caps = "CAP_SYS_PTRACE CAP_DAC_READ_SEARCH CAP_SYS_ADMIN CAP_KILL"
    for line in (f"AmbientCapabilities={caps}", f"CapabilityBoundingSet={caps}", "User=hmmirror",
                 "NoNewPrivileges=yes", "Type=notify", "LimitNOFILE="):  # fmt: skip
        assert line in (DEPLOY / "hmmd.service").read_text()


#: The only lines in which hmmd@.service's body (from ``[Unit]`` on) differs from hmmd.service's.
INSTANCE_LINES = {
    "Description=hmmirror host daemon (HMM mirroring over ZeroMQ)\n":
        "Description=hmmirror host daemon, instance %i (HMM mirroring over ZeroMQ)\n",
    "ExecStart=/usr/local/bin/hmmd run\n":
        "ExecStart=/usr/local/bin/hmmd run --endpoint ipc:///run/hmmirror/hmmd-%i.sock\n",
}  # fmt: skip


def test_the_instance_unit_is_hmmd_service_but_for_its_endpoint_and_shared_directory():
    """hmmd@.service is hmmd.service line for line, but for its name and the instance's own
    socket: a change to one unit that the other lacks fails here. Both keep /run/hmmirror
    when they stop, which the others serve from."""
    body = (DEPLOY / "hmmd.service").read_text().partition("[Unit]\n")[2]
    for old, new in INSTANCE_LINES.items():
        assert body.count(old) == 1, old
        body = body.replace(old, new)
    assert (DEPLOY / "hmmd@.service").read_text().partition("[Unit]\n")[2] == body
    assert "\nRuntimeDirectoryPreserve=yes\n" in body


def test_agent_unit_is_notify_and_does_not_restart_a_configuration_error():
    text = (DEPLOY / "hm-agent@.service").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "RestartPreventExitStatus=2",
                 "CapabilityBoundingSet=\n", "User=hmmirror-agent"):  # fmt: skip
        assert line in text
