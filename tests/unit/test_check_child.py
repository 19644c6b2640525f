"""The checker's children say how they ended: a target killed by a signal is told apart
from one that exited (the hmmd-restart scenario's target once died of SIGTRAP, reported only
as "exited")."""

from __future__ import annotations

import asyncio
import sys

import pytest
from hmmirror.tools.check.child import Child, ChildDied


async def _child(code: str) -> Child:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    return Child("target-0", proc)


@pytest.mark.parametrize(
    ("code", "told"),
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGTRAP)", "was killed by SIGTRAP"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "was killed by SIGKILL"),
        ("raise SystemExit(3)", "exited with status 3"),
    ],
)
async def test_a_dead_child_says_how_it_ended(code: str, told: str) -> None:
    child = await _child(code)
    with pytest.raises(ChildDied, match=f"target-0 \\(pid {child.pid}\\) {told}$"):
        await child.line(10)


async def test_a_child_that_only_closed_its_stdout_says_so() -> None:
    child = await _child("import os, time; os.close(1); time.sleep(30)")
    try:
        with pytest.raises(ChildDied, match=r"closed its stdout$"):
            await child.line(10)
    finally:
        child.kill()
        await child.reap()
