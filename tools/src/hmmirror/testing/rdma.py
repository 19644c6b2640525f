"""A real ``hm-agent`` process for tests, with CURVE keys and grants, driven from asyncio.

>>> async with hm_agent(hmmd, f"{pid}:{addr:#x}:4096:rw") as agent, agent.peer() as peer:
...     data = await peer.read(agent.rkeys[0], addr, 16)

On ``tcp://`` the agent is a CURVE server (its keys given through the
environment, ``HMMIRROR_AGENT_LISTEN_KEY`` and ``_ALLOW``) whose allow-list holds
one requester, granted every MR with ``rwa`` unless ``grants`` says otherwise;
``agent.requester(name)`` makes more key pairs. The agent is stopped with
SIGTERM afterwards and must exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hmmirror.client.curve import CurveKeys, generate

#: ``hm-agent`` as the test's interpreter runs it.
HM_AGENT = [sys.executable, "-m", "hmmirror.tools.agentapp"]
#: How long the agent gets to print its ready line, and to exit after SIGTERM.
DEADLINE = 10.0
#: In ``grants``: the default requester's public certificate.
REQUESTER = "REQUESTER"


class _Daemon(Protocol):
    """Anything with hmmd's endpoint (the ``hmmd`` fixture)."""

    endpoint: str


@dataclass
class Agent:
    """A running hm-agent: its endpoint, the MRs it printed (rkey by spec order), and keys.

    On a CURVE listener ``curve`` are the keys of the default requester (allowed,
    and granted what ``grants`` gave ``REQUESTER``); None on ipc:// or insecure.
    """

    proc: asyncio.subprocess.Process
    endpoint: str
    rkeys: list[int]
    lines: list[str]
    keys: str
    curve: CurveKeys | None
    errors: bytearray
    """What the agent wrote to stderr so far (read continuously: a full pipe would block it)."""

    @property
    def public_key(self) -> str:
        """The agent's public certificate (what requesters pass as the server key)."""
        return os.path.join(self.keys, "agent.key")

    @property
    def allow(self) -> str:
        """The agent's allow-list directory."""
        return os.path.join(self.keys, "allow")

    def requester(self, name: str, allowed: bool = True) -> tuple[str, CurveKeys]:
        """A new requester key pair (in the allow-list unless ``allowed`` is False): its
        public certificate's path and its CurveKeys for this agent."""
        return make_requester(self.keys, name, allowed)

    def peer(self, curve: CurveKeys | None = None, **kw: Any) -> Any:
        """``RdmaPeer.connect`` to the agent, as the default requester unless ``curve``."""
        from hmmirror.client.mlx5 import RdmaPeer

        if curve or self.curve:
            kw["curve"] = curve or self.curve
        return RdmaPeer.connect(self.endpoint, **kw)

    def hmmctl_keys(self) -> list[str]:
        """``hmmctl stat mr`` flags that authenticate as the default requester."""
        secret = os.path.join(self.keys, "requester.key_secret")
        return ["--agent-key", self.public_key, "--client-key", secret]


def make_requester(keys: str, name: str, allowed: bool) -> tuple[str, CurveKeys]:
    """Generate ``name``'s key pair in ``keys`` (and allow it); return (public path, keys)."""
    public, secret = generate(keys, name)
    if allowed:
        shutil.copy(public, os.path.join(keys, "allow"))
    return public, CurveKeys.load(os.path.join(keys, "agent.key"), secret)


def agent_keys() -> tuple[str, dict[str, str]]:
    """A fresh key directory (agent, default requester, allow-list) and the environment
    that makes ``hm-agent`` a CURVE server with it."""
    keys = tempfile.mkdtemp(prefix="hmak-", dir="/tmp")
    os.chmod(keys, 0o755)  # other users' requesters may read the public certificates
    os.mkdir(os.path.join(keys, "allow"))
    generate(keys, "agent")
    make_requester(keys, REQUESTER.lower(), True)
    env = {
        "HMMIRROR_AGENT_LISTEN_KEY": os.path.join(keys, "agent.key_secret"),
        "HMMIRROR_AGENT_LISTEN_ALLOW": os.path.join(keys, "allow"),
    }
    return keys, env


async def read_ready(proc: asyncio.subprocess.Process, errors: bytearray) -> list[str]:
    """``hm-agent``'s stdout up to its ready line; AssertionError if it exits first."""
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(DEADLINE):
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                await proc.wait()
                await asyncio.sleep(0.1)  # the stderr reader's last chunk
                raise AssertionError(f"hm-agent exited before ready: {errors.decode()}")
            lines.append(raw.decode().strip())
            if lines[-1].startswith("hm-agent ready "):
                return lines


async def _collect(stream: asyncio.StreamReader | None, sink: bytearray) -> None:
    """Append everything ``stream`` yields to ``sink`` until EOF."""
    while stream is not None and (chunk := await stream.read(65536)):
        sink += chunk


@contextlib.asynccontextmanager
async def hm_agent(
    hmmd: _Daemon,
    *mrs: str,
    name: str = "mlx5_t",
    listen: str = "tcp://127.0.0.1:0",
    insecure: bool = False,
    grants: Sequence[str] | None = None,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> AsyncIterator[Agent]:
    """Start ``hm-agent`` with ``--mr`` specs; stop it with SIGTERM and check it exits 0.

    ``grants`` are ``--grant`` values (``REQUESTER`` stands for the default
    requester's certificate); by default that requester gets every MR with rwa,
    or, with ``insecure`` (plain TCP), ``any`` does.
    """
    keys, key_env = agent_keys()
    args = ["--daemon", hmmd.endpoint, "--listen", listen, "--name", name]
    default = "any:*:rwa" if insecure else f"{REQUESTER}:*:rwa"
    for grant in [default] if grants is None else grants:
        args += ["--grant", grant.replace(REQUESTER, os.path.join(keys, "requester.key"))]
    if insecure:
        args.append("--insecure")
    curve = listen.startswith("tcp://") and not insecure
    full_env = dict(os.environ, **(key_env if curve else {}), **(env or {}))
    for spec in mrs:
        args += ["--mr", spec]
    try:
        proc = await asyncio.create_subprocess_exec(
            *HM_AGENT, *args, *extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env
        )
        errors = bytearray()
        reader = asyncio.ensure_future(_collect(proc.stderr, errors))
        try:
            lines = await read_ready(proc, errors)
            found = (re.search(r"rkey=(0x[0-9a-f]+)", line) for line in lines)
            rkeys = [int(m.group(1), 16) for m in found if m]
            requester = CurveKeys.load(
                os.path.join(keys, "agent.key"), os.path.join(keys, "requester.key_secret")
            )
            endpoint = lines[-1].split()[-1]
            yield Agent(proc, endpoint, rkeys, lines, keys, requester if curve else None, errors)
        finally:
            try:
                await stop(proc, errors)
            finally:
                reader.cancel()
    finally:
        shutil.rmtree(keys, ignore_errors=True)


async def stop(proc: asyncio.subprocess.Process, errors: bytearray) -> None:
    """SIGTERM the agent; AssertionError unless it exits 0 within the deadline."""
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(DEADLINE):
            code = await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("hm-agent ignored SIGTERM") from None
    await asyncio.sleep(0.1)  # the stderr reader's last chunk
    assert code == 0, f"hm-agent exited {code}: {errors.decode()}"
