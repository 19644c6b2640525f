"""The controller's listening socket, which a puppet and every child it forks dial back to.

The hub also starts the top puppet process (:meth:`PuppetHub.start_process`).

Each puppet process connects once to the hub's abstract unix socket and says
``{"hello": pid}``; :meth:`PuppetHub.claim` hands that connection to the
:class:`~hmmirror.testing.puppet.Puppet` that waits for that pid (the first one
spawned, or a child just forked), whichever arrives first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import Mapping

from hmmirror.testing.puppet_wire import ABSTRACT_PREFIX, DEFAULT_TIMEOUT, PuppetDied, PuppetError

__all__ = ["Conn", "PuppetHub"]

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class PuppetHub:
    """The listening socket a puppet and every child it forks dial back to."""

    def __init__(self) -> None:
        self.name = f"hmmirror-puppet-{os.getpid()}-{secrets.token_hex(6)}"
        self.address = ABSTRACT_PREFIX + self.name
        self._waiting: dict[int, asyncio.Future[Conn]] = {}
        self._arrived: dict[int, Conn] = {}
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        """Listen on the hub's abstract unix socket."""
        self._server = await asyncio.start_unix_server(self._on_connect, path="\0" + self.name)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read a process's hello; hand the connection to its ``claim``, or keep it."""
        self._writers.append(writer)
        try:
            async with asyncio.timeout(DEFAULT_TIMEOUT):
                line = await reader.readline()
            pid = int(json.loads(line)["hello"])
        except (TimeoutError, ValueError, KeyError, TypeError):
            writer.close()
            return
        fut = self._waiting.pop(pid, None)
        if fut is not None and not fut.done():
            fut.set_result((reader, writer))
        else:
            self._arrived[pid] = (reader, writer)

    async def claim(self, pid: int, timeout: float) -> Conn:
        """Wait for the connection of process ``pid``."""
        if pid in self._arrived:
            return self._arrived.pop(pid)
        fut: asyncio.Future[Conn] = asyncio.get_running_loop().create_future()
        self._waiting[pid] = fut
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise PuppetError(f"puppet pid {pid} did not connect within {timeout} s") from None
        finally:
            self._waiting.pop(pid, None)

    async def start_process(
        self, python: str, env: Mapping[str, str] | None
    ) -> asyncio.subprocess.Process:
        """Start ``python -m hmmirror.testing.puppet_target`` dialing this hub."""
        full_env = dict(os.environ if env is None else env)
        # The child must import this very package, wherever it was imported from.
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (pkg_root, full_env.get("PYTHONPATH", "")) if p
        )
        return await asyncio.create_subprocess_exec(
            python, "-m", "hmmirror.testing.puppet_target", "--connect", self.address,
            stdin=asyncio.subprocess.DEVNULL, env=full_env,
        )  # fmt: skip

    async def claim_or_died(self, proc: asyncio.subprocess.Process, timeout: float) -> Conn:
        """Wait for ``proc`` to connect; raise PuppetDied if it exits first."""
        claim = asyncio.ensure_future(self.claim(proc.pid, timeout))
        died = asyncio.ensure_future(proc.wait())
        try:
            done, _ = await asyncio.wait({claim, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
        if claim in done:
            return claim.result()
        claim.cancel()
        raise PuppetDied(f"puppet pid {proc.pid} exited with {proc.returncode} before connecting")

    async def close(self) -> None:
        """Stop listening and close every puppet connection."""
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        for w in self._writers:
            with contextlib.suppress(Exception):
                await w.wait_closed()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
