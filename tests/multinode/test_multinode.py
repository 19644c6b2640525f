"""Multi-node: hmmd in host A, agents in hosts B and C, over CURVE on a real bridge.

Hosts are network namespaces (``hmmirror.testing.netns``) with addresses in
10.231.0.0/24 that exist only inside them; the test removes them all. Agents
are separate processes (``hmmirror.testing.remote_agent``) driven by stdin.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hmmirror.client.curve import generate
from hmmirror.testing.netns import Cluster, Host

pytestmark = pytest.mark.multinode
PAGE = 4096
DEADLINE = 10.0


class Remote:
    """A remote_agent process and its line protocol."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    async def line(self, timeout: float = DEADLINE) -> dict:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        assert raw, "the agent exited"
        return json.loads(raw)

    async def ask(self, cmd: str, timeout: float = DEADLINE) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()
        return await self.line(timeout)


class Keys:
    """hmmd's certificate, an allow-list directory, and one client certificate per agent."""

    def __init__(self, root: Path, agents: list[str]) -> None:
        self.server_public, self.server_secret = generate(str(root / "server"), "hmmd")
        self.allow = root / "allow"
        self.allow.mkdir()
        self.clients: dict[str, str] = {}
        for name in agents:
            public, secret = generate(str(root / name), name)
            (self.allow / f"{name}.key").write_bytes(Path(public).read_bytes())
            self.clients[name] = secret


def start_hmmd(
    host: Host, keys: Keys, workdir: Path, port: str = "0"
) -> tuple[subprocess.Popen[bytes], str]:
    err = open(workdir / "hmmd.stderr", "ab")  # noqa: SIM115 - the child keeps its copy
    proc = host.spawn(
        [sys.executable, "-m", "hmmirror.daemon", "run", "--endpoint", f"tcp://{host.addr}:{port}",
         "--curve-key", keys.server_secret, "--curve-allow", str(keys.allow),
         "--ack-deadline", "1s", "--heartbeat", "200ms"],
        stdout=subprocess.PIPE, stderr=err,
        env={"HMMIRROR_EXPOSE_SOCKET": str(workdir / "uffd.sock"), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    err.close()
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith("hmmd ready tcp://"), (workdir / "hmmd.stderr").read_text()
    return proc, line.split()[-1]


def start_agent(host: Host, keys: Keys, name: str, endpoint: str, pid: int, addr: int,
                npages: int) -> Remote:  # fmt: skip
    proc = host.spawn(
        [sys.executable, "-m", "hmmirror.testing.remote_agent", endpoint, str(pid), hex(addr),
         str(npages), "--server-key", keys.server_public, "--client-key", keys.clients[name],
         "--name", name, "--timeout", "2"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return Remote(proc)


async def until(remote: Remote, check, what: str, deadline: float = DEADLINE) -> dict:
    end = time.monotonic() + deadline
    while True:
        state = await remote.ask("state")
        if check(state):
            return state
        if time.monotonic() > end:
            raise AssertionError(f"{what}: last state {state}")
        await asyncio.sleep(0.05)


async def test_agent_in_b_mirrors_a_target_in_a_over_curve(puppet, tmp_path):
    keys = Keys(tmp_path, ["b"])
    with Cluster(2) as (a, b):
        _, endpoint = start_hmmd(a, keys, tmp_path)
        addr = await puppet.mmap(2 * PAGE)
        await puppet.write(addr, b"A" * 2 * PAGE)
        agent = start_agent(b, keys, "b", endpoint, puppet.pid, addr, 2)
        ready = await agent.line()
        assert ready["ready"]
        read = await agent.ask("read")
        assert read["pages"] == ["41" * 16] * 2 and read["faults"] >= 1
        await puppet.madvise(addr, PAGE, "dontneed")
        await puppet.write(addr, b"B" * PAGE)
        state = await until(agent, lambda s: s["events"], "an invalidation reaching host B")
        assert state["events"][0][0] == addr
        assert (await agent.ask("read"))["pages"] == ["42" * 16, "41" * 16]


async def test_a_cut_link_evicts_b_after_its_deadline_c_carries_on_b_comes_back_fresh(
    puppet, tmp_path
):
    keys = Keys(tmp_path, ["b", "c"])
    with Cluster(3) as (a, b, c):
        _, endpoint = start_hmmd(a, keys, tmp_path)
        addr = await puppet.mmap(PAGE)
        await puppet.write(addr, b"A" * PAGE)
        agent_b = start_agent(b, keys, "b", endpoint, puppet.pid, addr, 1)
        agent_c = start_agent(c, keys, "c", endpoint, puppet.pid, addr, 1)
        assert (await agent_b.line())["ready"] and (await agent_c.line())["ready"]
        assert (await agent_b.ask("read"))["pages"] == ["41" * 16]
        assert (await agent_c.ask("read"))["pages"] == ["41" * 16]
        before = (await agent_b.ask("state"))["epoch"]

        b.cut()
        await puppet.madvise(addr, PAGE, "dontneed")
        await puppet.write(addr, b"C" * PAGE)
        t0 = time.monotonic()
        # C is told at once; its read of the page waits only until the invalidation
        # completes, which B's 1 s ack deadline bounds.
        await until(agent_c, lambda s: s["events"], "C's invalidation", deadline=3)
        assert (await agent_c.ask("read"))["pages"] == ["43" * 16]
        assert time.monotonic() - t0 < 5

        b.heal()
        # B's session was fenced (evicted) or lost (silent lease): either way it comes back
        # under a fresh session and must re-register; it never reads through the old entry.
        state = await until(agent_b, lambda s: s["dropped"] and not s["lost"], "B noticing")
        assert state["held"] == 0
        again = await agent_b.ask("remirror")
        for _ in range(50):
            if "mirror" in again:
                break
            await asyncio.sleep(0.1)
            again = await agent_b.ask("remirror")
        assert again["mirror"] != state["mirror"]
        assert again["epoch"] == before, "hmmd did not restart; the session is new"
        assert (await agent_b.ask("read"))["pages"] == ["43" * 16]


@pytest.mark.parametrize("signal_name", ["SIGSTOP", "SIGKILL"])
async def test_a_stopped_or_killed_agent_is_evicted_at_its_deadline_and_c_carries_on(
    puppet, tmp_path, signal_name
):
    import signal

    keys = Keys(tmp_path, ["b", "c"])
    with Cluster(3) as (a, b, c):
        _, endpoint = start_hmmd(a, keys, tmp_path)
        addr = await puppet.mmap(PAGE)
        await puppet.write(addr, b"A" * PAGE)
        agent_b = start_agent(b, keys, "b", endpoint, puppet.pid, addr, 1)
        agent_c = start_agent(c, keys, "c", endpoint, puppet.pid, addr, 1)
        assert (await agent_b.line())["ready"] and (await agent_c.line())["ready"]
        assert (await agent_b.ask("read"))["pages"] == ["41" * 16]
        assert (await agent_c.ask("read"))["pages"] == ["41" * 16]
        b.kill(agent_b.proc, getattr(signal, signal_name))
        await puppet.madvise(addr, PAGE, "dontneed")
        await puppet.write(addr, b"D" * PAGE)
        t0 = time.monotonic()
        await until(agent_c, lambda s: s["events"], "C's invalidation", deadline=3)
        assert (await agent_c.ask("read"))["pages"] == ["44" * 16]
        assert time.monotonic() - t0 < 5, "B blocked C for longer than its deadline"
        if signal_name == "SIGSTOP":
            b.kill(agent_b.proc, signal.SIGCONT)
            state = await until(agent_b, lambda s: s["dropped"], "B noticing its eviction")
            assert state["held"] == 0
            assert (await agent_b.ask("read"))["pages"] == ["44" * 16]


async def test_after_an_hmmd_restart_agents_see_a_new_epoch_and_re_register(puppet, tmp_path):
    import signal

    keys = Keys(tmp_path, ["b"])
    with Cluster(2) as (a, b):
        first, endpoint = start_hmmd(a, keys, tmp_path)
        addr = await puppet.mmap(PAGE)
        await puppet.write(addr, b"A" * PAGE)
        agent = start_agent(b, keys, "b", endpoint, puppet.pid, addr, 1)
        epoch = (await agent.line())["epoch"]
        assert (await agent.ask("read"))["pages"] == ["41" * 16]
        a.kill(first, signal.SIGKILL)
        first.wait(DEADLINE)
        await puppet.write(addr, b"E" * PAGE)
        port = endpoint.rsplit(":", 1)[1]
        _, again = start_hmmd(a, keys, tmp_path, port=port)
        assert again == endpoint
        state = await until(agent, lambda s: s["epoch"] != epoch and not s["lost"],
                            "the agent's fresh session with the new hmmd")  # fmt: skip
        assert state["held"] == 0, "nothing survives a restart"
        read = await agent.ask("read")
        assert read["pages"] == ["45" * 16], read
        assert (await agent.ask("state"))["mirror"] != 0
