"""Authorization policy: grants by agent identity, target owner, executable and cgroup.

The agents here are local (``ipc://``, identified by uid through SO_PEERCRED);
``test_security.py`` covers CURVE identities over TCP.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hmmirror.client import Access, RemoteError
from hmmirror.proto import ErrorCode

PAGE = 4096


def policy_file(tmp: str, body: str) -> str:
    path = f"{tmp}/policy.toml"
    with open(path, "w") as f:
        f.write(body)
    return path


@pytest.fixture
def nobody_process():
    """A process owned by uid 65534 (nobody), sleeping."""
    proc = subprocess.Popen(["sleep", "60"], user=65534, group=65534)
    yield proc
    proc.kill()
    proc.wait()


POLICY = f"""
[[grant]]
agents = ["uid:0"]
uids = [0]
exes = ["{sys.executable}", "/usr/bin/python3.11", "/usr/local/bin/python3.11"]
access = ["read"]
"""


@pytest.fixture
def hmmd_extra_args(tmp_path):
    """The policy for this module's hmmd (read by the hmmd fixture)."""
    exe = os.path.realpath(sys.executable)
    return [
        "--policy",
        policy_file(str(tmp_path), POLICY.replace("/usr/local/bin/python3.11", exe)),
    ]


async def test_policy_grants_and_refuses(hmmd_extra_args, hmmd, puppet, nobody_process, agent):
    addr = await puppet.mmap(PAGE)
    async with agent() as s:
        mirror = await s.mirror(puppet.pid, addr, PAGE, Access.READ)  # granted: read, uid 0
        assert (await mirror.read(addr, 1)).cpages == 1
        with pytest.raises(RemoteError) as info:  # the grant gives read only
            await s.mirror(puppet.pid, addr, PAGE, Access.READ | Access.WRITE)
        assert info.value.code == ErrorCode.PERMISSION_DENIED
        with pytest.raises(RemoteError) as info:  # another uid's process: no grant
            await s.mirror(nobody_process.pid, 0x10000, PAGE, Access.READ)
        assert info.value.code == ErrorCode.PERMISSION_DENIED
        assert "uid 65534" in info.value.message
        with pytest.raises(RemoteError) as info:
            await s.sync_range(nobody_process.pid, 0x10000, 0x11000)
        assert info.value.code == ErrorCode.PERMISSION_DENIED
    assert "refused register by session" in hmmd.stderr()


def test_a_malformed_policy_is_a_configuration_error(tmp_path):
    path = policy_file(str(tmp_path), '[[grant]]\nagents = ["uid:0"]\naccess = ["execute"]\n')
    out = subprocess.run(
        [sys.executable, "-m", "hmmirror.daemon", "run", "--policy", path, "--endpoint",
         f"ipc://{tmp_path}/h.sock"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    assert "grant 1" in out.stderr and "execute" in out.stderr
