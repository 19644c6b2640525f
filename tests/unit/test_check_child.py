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


async def test_a_cancel_that_comes_with_a_childs_line_is_not_lost() -> None:
    """SIGTERM cancels the checker's run; a cancel in the very loop turn a child's answer
    arrives must still end it. ``asyncio.wait_for`` on Python 3.11 returned the line instead
    (CPython bpo-42130), and the checker went on with its rounds for good (CI, 2026-12-07)."""
    child = await _child("import sys; sys.stdin.readline()")
    try:
        reading = asyncio.ensure_future(child.line(10))
        for _ in range(5):
            await asyncio.sleep(0)  # the read now waits for a line
        assert child.proc.stdout is not None
        child.proc.stdout.feed_data(b'{"answer": 1}\n')  # it arrives: the read can end this turn
        reading.cancel()  # and the cancel comes in the same turn
        with pytest.raises(asyncio.CancelledError):
            await reading
    finally:
        child.kill()
        await child.reap()
