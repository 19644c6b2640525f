"""hmmd's lifecycle lines, with their structured fields, in its JSON log."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest


@pytest.mark.timeout(60)
@pytest.mark.hmmd_args("--log-format", "json")
async def test_session_open_close_and_shutdown_are_logged_with_fields(hmmd, agent) -> None:
    async with agent("nic0"):
        pass  # hello, then goodbye
    hmmd.kill(signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while hmmd.proc.poll() is None:
        assert loop.time() < deadline, "hmmd did not exit on SIGTERM"
        await asyncio.sleep(0.05)
    assert hmmd.proc.returncode == 0
    records = [json.loads(line) for line in hmmd.stderr().splitlines()]
    opened = [r for r in records if "opened by nic0" in r["msg"]]
    assert len(opened) == 1, records
    assert opened[0]["agent"] == "nic0" and opened[0]["pid"] == os.getpid()
    assert isinstance(opened[0]["session"], int) and opened[0]["peer"]
    closed = [r for r in records if "closed by its agent" in r["msg"]]
    assert [(r["session"], r["agent"]) for r in closed] == [(opened[0]["session"], "nic0")]
    assert any(r["msg"].startswith("shutting down") for r in records), records


FORGED = "error hmmirror.daemon.app: hmmd stopped (forged)"


@pytest.mark.timeout(60)
async def test_a_name_a_peer_chose_cannot_forge_a_log_line_or_drive_a_terminal(
    hmmd, agent, puppet
) -> None:
    """An agent's name is the peer's to choose (64 characters, any of them): with a newline
    it made hmmd's text log show a line hmmd never wrote, and with an escape sequence it
    reached the terminal of whoever ran ``hmmctl mirrors``. Both come out escaped."""
    import subprocess
    import sys

    addr = await puppet.mmap(4096)
    async with agent(f"x\n{FORGED}") as forger, agent("y\x1b[2J\x1b]0;owned\x07") as painter:
        await forger.mirror(puppet.pid, addr, 4096)
        await painter.mirror(puppet.pid, addr, 4096)
        listed = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "hmmirror.tools.ctlapp", "--endpoint", hmmd.endpoint, "mirrors"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    lines = hmmd.stderr().splitlines()
    assert not [ln for ln in lines if FORGED in ln.split("Z ", 1)[-1][: len(FORGED)]], lines
    assert any("x\\x0aerror hmmirror.daemon.app" in ln for ln in lines), lines
    assert listed.returncode == 0, listed.stderr
    assert "\x1b" not in listed.stdout and "\x07" not in listed.stdout, repr(listed.stdout)
    assert "y\\x1b[2J" in listed.stdout, listed.stdout
