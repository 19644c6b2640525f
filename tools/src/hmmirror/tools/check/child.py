"""A child process of the checker (the target, an agent) that answers one line per command.

The checker drives its children over their stdin and stdout: one command line
in, one answer line out (JSON for the agents). Every read has a deadline; a
child that closed its stdout is :class:`ChildDied`, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from typing import Any

__all__ = ["COMMAND_DEADLINE", "Child", "ChildDied"]

#: Seconds one agent command may take (``pause`` waits for in-flight operations).
COMMAND_DEADLINE = 15.0


class ChildDied(Exception):
    """A child process closed its stdout (exited, or was killed)."""


class Child:
    """A child process that answers one line per command."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc

    @property
    def pid(self) -> int:
        """The child's pid."""
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """Still running."""
        return self.proc.returncode is None

    async def line(self, timeout: float = COMMAND_DEADLINE) -> str:
        """The next stdout line; ChildDied on EOF, TimeoutError past ``timeout``."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            raw = await self.proc.stdout.readline()
        if not raw:
            raise ChildDied(f"{self.name} (pid {self.pid}) {await self._how_it_ended()}")
        return raw.decode().rstrip("\n")

    async def _how_it_ended(self) -> str:
        """``exited with status N`` or ``was killed by SIGX`` (waiting a moment for the exit
        that follows a closed stdout), or ``closed its stdout`` if it still runs."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.proc.wait()
        code = self.proc.returncode
        if code is None:
            return "closed its stdout"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def send(self, text: str) -> None:
        """Write one command line."""
        assert self.proc.stdin is not None
        if self.proc.stdin.is_closing():
            raise ChildDied(f"{self.name} (pid {self.pid}) exited")
        self.proc.stdin.write(text.encode() + b"\n")

    async def ask(self, text: str, timeout: float = COMMAND_DEADLINE) -> dict[str, Any]:
        """Send a command and return its JSON answer."""
        self.send(text)
        return dict(json.loads(await self.line(timeout)))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the child if it still runs."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def reap(self, timeout: float = 5.0) -> int | None:
        """Wait for the child to exit (SIGKILL after ``timeout``); its return code."""
        try:
            async with asyncio.timeout(timeout):
                return await self.proc.wait()
        except TimeoutError:
            self.kill()
            async with asyncio.timeout(5.0):
                return await self.proc.wait()
