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
