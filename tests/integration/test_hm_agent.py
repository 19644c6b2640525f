"""``hm-agent`` as a process: remote READ, WRITE and atomics by rkey, errors, stat mr, CLI.

The agent is a real process on a real hmmd, serving over tcp loopback with CURVE;
the requesters are ``RdmaPeer`` connections (each its own ZeroMQ context and
socket) with an allowed and granted key (``hmmirror.testing.rdma``).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hmmirror.client import DeviceError
from hmmirror.client.curve import generate
from hmmirror.client.mlx5 import RdmaPeer, RemoteAccessError
from hmmirror.testing.rdma import DEADLINE, HM_AGENT, hm_agent

__all__ = ["hm_agent"]  # test_fuzz_socket.py takes it from here
PAGE = 4096
HMMCTL = [sys.executable, "-m", "hmmirror.tools.ctlapp"]


async def test_remote_read_write_and_atomics_through_hm_agent(hmmd, puppet):
    addr = await puppet.mmap(64 * PAGE)
    data = os.urandom(64 * PAGE)
    await puppet.write(addr, data)
    async with (
        hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{64 * PAGE}:rwa") as agent,
        agent.peer() as peer,
    ):
        (rkey,) = agent.rkeys
        assert bytes(await peer.read(rkey, addr, 64 * PAGE)) == data
        assert bytes(await peer.read(rkey, addr + 5, 11)) == data[5:16]
        await peer.write(rkey, addr + 4093, b"spans two pages")
        assert await puppet.read(addr + 4093, 15) == b"spans two pages"
        big = os.urandom(40 * PAGE)
        await peer.write(rkey, addr + 8 * PAGE, big)
        assert await puppet.read(addr + 8 * PAGE, 40 * PAGE) == big
        await puppet.write(addr, (41).to_bytes(8, "little"))
        assert await peer.fetch_add(rkey, addr, 1) == 41
        assert await peer.compare_swap(rkey, addr, 42, 7) == 42
        assert int.from_bytes(await puppet.read(addr, 8), "little") == 7


async def test_concurrent_fetch_and_add_from_two_requesters_loses_nothing(hmmd, puppet):
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, bytes(8))
    per_peer = 300
    async with (
        hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{PAGE}:ra") as agent,
        agent.peer() as one,
        agent.peer() as two,
    ):
        (rkey,) = agent.rkeys

        async def hammer(peer: RdmaPeer) -> list[int]:
            # Many in flight at once: the agent runs them concurrently.
            return list(
                await asyncio.gather(*(peer.fetch_add(rkey, addr, 1) for _ in range(per_peer)))
            )

        olds = await asyncio.gather(hammer(one), hammer(two))
        seen = sorted(olds[0] + olds[1])
        assert seen == list(range(2 * per_peer)), "every increment saw a distinct old value"
        assert int.from_bytes(await puppet.read(addr, 8), "little") == 2 * per_peer


async def test_rdma_errors_follow_verbs_semantics(hmmd, puppet):
    addr = await puppet.mmap(4 * PAGE)
    await puppet.write(addr, b"x" * 4 * PAGE)
    specs = (f"{puppet.pid}:{addr:#x}:{4 * PAGE}:rwa", f"{puppet.pid}:{addr:#x}:{4 * PAGE}:r")
    async with hm_agent(hmmd, *specs) as agent, agent.peer() as peer:
        rw, ro = agent.rkeys
        for op in (
            peer.read(rw ^ 0x100, addr, 8),  # no such rkey
            peer.read(rw, addr + 4 * PAGE - 4, 8),  # past the MR's end
            peer.read(rw, addr - 8, 8),  # before its start
            peer.write(ro, addr, b"no write right"),
            peer.fetch_add(ro, addr, 1),  # no atomic right
        ):
            with pytest.raises(RemoteAccessError) as info:
                await op
            assert info.value.errno == errno.EACCES
        with pytest.raises(DeviceError) as info:
            await peer.fetch_add(rw, addr + 4, 1)
        assert info.value.errno == errno.EINVAL

        await puppet.mprotect(addr + PAGE, PAGE, "r")
        with pytest.raises(DeviceError) as info:
            await peer.write(rw, addr + PAGE, b"read-only page")
        assert info.value.errno == errno.EPERM
        assert bytes(await peer.read(rw, addr + PAGE, 4)) == b"xxxx"

        await puppet.munmap(addr + 2 * PAGE, PAGE)
        for op in (peer.read(rw, addr + 2 * PAGE, 8), peer.write(rw, addr + 2 * PAGE, b"gone")):
            with pytest.raises(DeviceError) as info:
                await op
            assert info.value.errno == errno.EFAULT
        # The agent is still healthy after every failure.
        assert bytes(await peer.read(rw, addr, 8)) == b"x" * 8


async def test_hmmctl_stat_mr_prints_rdma_stat_mr_lines(hmmd, puppet):
    addr = await puppet.mmap(8 * PAGE)
    async with (
        hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{8 * PAGE}:rw", f"{puppet.pid}:all:r") as agent,
        agent.peer() as peer,
    ):
        rkey, implicit_rkey = agent.rkeys
        await puppet.write(addr, b"y" * 8 * PAGE)
        await peer.read(rkey, addr, 8 * PAGE)
        await peer.read(implicit_rkey, addr, PAGE)

        def hmmctl(*extra: str) -> str:
            out = subprocess.run(
                [*HMMCTL, "stat", "mr", "--agent", agent.endpoint, *agent.hmmctl_keys(), *extra],
                capture_output=True, text=True, timeout=DEADLINE, check=True,
            )  # fmt: skip
            return out.stdout

        lines = (await asyncio.to_thread(hmmctl)).splitlines()
        shape = (
            r"dev mlx5_t mrn (\d+) page_faults (\d+) page_faults_handled (\d+) "
            r"page_invalidations (\d+) page_invalidations_handled (\d+) page_prefetch (\d+)"
        )
        rows = [re.fullmatch(shape, ln) for ln in lines]
        assert all(rows) and len(rows) == 2, lines
        assert [int(r.group(2)) for r in rows if r] == [8, 1]  # pages faulted: 8, then 1
        assert [int(r.group(3)) for r in rows if r] == [1, 1]  # one fault event each
        as_json = json.loads(await asyncio.to_thread(hmmctl, "--json", "--details"))
        assert [e["page_faults"] for e in as_json] == [8, 1]
        assert int(as_json[0]["rkey"], 16) == rkey and as_json[1]["mrlen"] == 2**64 - 1


def test_hm_agent_usage_errors_exit_2():
    for bad in (["--mr", "nope"], ["--mr", "1:0x1000"], ["--mr", "1:0x1000:4K:rx"]):
        out = subprocess.run([*HM_AGENT, *bad], capture_output=True, text=True, timeout=DEADLINE)
        assert out.returncode == 2, (bad, out.stderr)
        assert "--mr" in out.stderr
    out = subprocess.run([*HM_AGENT, "--help"], capture_output=True, text=True, timeout=DEADLINE)
    assert out.returncode == 0 and "PID:ADDR:LENGTH" in out.stdout


def test_hm_agent_listener_settings_errors_are_one_line_exit_2(tmp_path):
    """Bad keys, allow-lists and grants are refused before anything starts, in one line."""
    public, secret = generate(str(tmp_path), "agent")
    loose = tmp_path / "loose.key_secret"
    loose.write_bytes(Path(secret).read_bytes())
    loose.chmod(0o644)
    only_public = tmp_path / "public.key"  # private, but no secret key in it
    only_public.write_bytes(Path(public).read_bytes())
    only_public.chmod(0o600)
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text("not a certificate")
    garbage.chmod(0o600)
    (tmp_path / "allow").mkdir()
    (tmp_path / "agent.toml").write_text('[[grant]]\nrequesters = ["any"]\nmrs = ["mr1"]\n')
    tcp = ["--listen", "tcp://127.0.0.1:0"]
    ok_keys = ["--listen-key", secret, "--listen-allow", str(tmp_path / "allow")]
    mr = ["--mr", "1:0x1000:4K:r"]
    for bad, says in (
        ([*tcp], "set listen_key"),
        ([*tcp, "--listen-key", secret, "--listen-allow", str(tmp_path / "no")], "not a directory"),
        ([*tcp, "--listen-key", str(only_public), "--listen-allow", str(tmp_path)], "no secret"),
        ([*tcp, "--listen-key", str(loose), "--listen-allow", str(tmp_path)], "chmod 600"),
        ([*tcp, "--listen-key", str(garbage), "--listen-allow", str(tmp_path)], "listen_key"),
        (
            [*tcp, "--listen-key", str(tmp_path / "absent"), "--listen-allow", str(tmp_path)],
            "cannot read",
        ),
        ([*tcp, "--insecure", *ok_keys[:2]], "exclude each other"),
        (["--listen", "ipc:///tmp/x.sock", "--insecure"], "tcp:// only"),
        (["--listen", "udp://127.0.0.1:1"], "only tcp:// and ipc://"),
        ([*tcp, *ok_keys, *mr, "--grant", "nobody:mr1:r"], "not 'any', 'uid:N'"),
        ([*tcp, *ok_keys, *mr, "--grant", "any:mr2:r"], "does not register"),
        ([*tcp, *ok_keys, *mr, "--grant", "any:mr1:rx"], "rights"),
        ([*tcp, *ok_keys, *mr, "--grant", "any:mr1"], "REQUESTER:MR1,MR2:RIGHTS"),
        ([*tcp, *ok_keys, *mr, "--grant", f"{tmp_path}/absent.key:mr1:r"], "certificate"),
        ([*tcp, *ok_keys, "--mr", "x=1:0x1000:4K", "--mr", "x=1:0x2000:4K"], "must differ"),
        ([*tcp, *ok_keys, "--mr", "a b=1:0x1000:4K"], "name"),
        ([*tcp, *ok_keys, *mr, "--config", str(tmp_path / "agent.toml")], "exactly requesters"),
    ):
        out = subprocess.run([*HM_AGENT, *bad], capture_output=True, text=True, timeout=DEADLINE)
        assert out.returncode == 2, (bad, out.stderr)
        assert out.stderr.count("\n") == 1 and says in out.stderr, (bad, out.stderr)


def test_hm_agent_without_hmmd_exits_1(tmp_path):
    start = time.monotonic()
    out = subprocess.run(
        [*HM_AGENT, "--daemon", f"ipc://{tmp_path}/absent.sock", "--listen", "tcp://127.0.0.1:0",
         "--insecure"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "cannot connect to hmmd" in out.stderr and "is the server running?" in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert time.monotonic() - start < 20


async def test_hm_agent_refusing_a_registration_exits_1(hmmd, puppet):
    proc = await asyncio.create_subprocess_exec(
        *HM_AGENT, "--daemon", hmmd.endpoint, "--listen", "tcp://127.0.0.1:0", "--insecure",
        "--mr", f"{puppet.pid}:0x1000:4K:r", "--mr", "999999999:0x1000:4K:r",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(DEADLINE):
        out, err = await proc.communicate()
    assert proc.returncode == 1, err
    assert b"hm-agent ready" not in out


def test_hmmctl_stat_mr_key_errors_are_one_line_exit_2(tmp_path):
    public, secret = generate(str(tmp_path), "me")
    for bad, says in (
        (["--agent-key", public], "both --agent-key and --client-key"),
        (["--client-key", secret], "both --agent-key and --client-key"),
        (["--agent-key", public, "--client-key", public], "no secret key"),
        (["--agent-key", str(tmp_path / "absent"), "--client-key", secret], "absent"),
    ):
        out = subprocess.run(
            [*HMMCTL, "stat", "mr", "--agent", "tcp://127.0.0.1:9", *bad],
            capture_output=True, text=True, timeout=DEADLINE,
        )  # fmt: skip
        assert out.returncode == 2, (bad, out.stderr)
        assert out.stderr.count("\n") == 1 and says in out.stderr, (bad, out.stderr)


def test_hm_agent_config_layers_file_then_environment_then_flags(tmp_path):
    """The file is beaten by HMMIRROR_AGENT_LISTEN (an empty one is unset), which --listen
    beats; --grant adds to the file's grants; check-config exits 0 only when all is good."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        'listen = "udp://127.0.0.1:1"\nmr = ["buf=1:0x1000:4K:rw"]\n'
        '[[grant]]\nrequesters = ["any"]\nmrs = ["buf"]\nrights = "r"\n'
    )
    ipc = {"HMMIRROR_AGENT_LISTEN": f"ipc://{tmp_path}/agent.sock"}

    def check(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*HM_AGENT, "--config", str(cfg), *flags, "check-config"],
            capture_output=True, text=True, timeout=DEADLINE, env={**os.environ, **(env or {})},
        )  # fmt: skip

    out = check()
    assert out.returncode == 2 and "only tcp:// and ipc://" in out.stderr, out.stderr
    assert check(env={"HMMIRROR_AGENT_LISTEN": ""}).returncode == 2
    out = check(env=ipc)
    assert (out.returncode, out.stdout) == (0, "configuration OK\n"), out.stderr
    out = check("--listen", "udp://127.0.0.1:2", env=ipc)
    assert out.returncode == 2 and "udp://127.0.0.1:2" in out.stderr, out.stderr
    out = check("--grant", "uid:0:nope:r", env=ipc)
    assert out.returncode == 2 and "names MR 'nope'" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1
