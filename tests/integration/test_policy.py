"""Authorization as root sees it: the kernel's rule lets root agents mirror anything but hmmd,
whatever the policy; a malformed policy is a configuration error.

Grants for other users, and the attacks they must not allow, run as real other users in
``tests/security/`` (``test_policy_grants.py``, ``test_policy_attacks.py``);
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
HMMD = [sys.executable, "-m", "hmmirror.daemon"]


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


def stack_start(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return next(int(line.split("-")[0], 16) for line in f if line.rstrip().endswith("[stack]"))


@pytest.fixture
def hmmd_extra_args(tmp_path):
    """A policy that grants nothing to root: root's rights come from the kernel's rule."""
    return ["--policy", policy_file(str(tmp_path), '[[grant]]\nagents = ["uid:4242"]\n'
                                    'uids = [4242]\naccess = ["read"]\n')]  # fmt: skip


async def test_root_agents_mirror_and_write_anything_but_hmmd(
    hmmd_extra_args, hmmd, puppet, nobody_process, agent
):
    addr = await puppet.mmap(PAGE)
    async with agent() as s:
        mirror = await s.mirror(puppet.pid, addr, PAGE, Access.READ | Access.WRITE)
        await mirror.write(addr, b"w" * PAGE)
        assert await puppet.read(addr, PAGE) == b"w" * PAGE
        await s.mirror(nobody_process.pid, stack_start(nobody_process.pid), PAGE, Access.READ)
        await s.sync_range(nobody_process.pid, 0x10000, 0x11000)
        with pytest.raises(RemoteError) as info:
            await s.mirror(hmmd.proc.pid, stack_start(hmmd.proc.pid), PAGE, Access.READ)
        assert info.value.code == ErrorCode.PERMISSION_DENIED
        assert "hmmd itself" in info.value.message
        with pytest.raises(RemoteError) as info:  # nor hmmd's threads, nor by sync_range
            await s.sync_range(hmmd.proc.pid, 0x10000, 0x11000)
        assert info.value.code == ErrorCode.PERMISSION_DENIED
        stats = await s.status()
        assert stats["pid"] == hmmd.proc.pid and stats["refusals"] == 2  # root sees it all
    assert "refused register by session" in hmmd.stderr()


async def test_a_thread_of_hmmd_is_hmmd(hmmd, puppet, agent):
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"t" * PAGE)
    async with agent() as s:
        mirror = await s.mirror(puppet.pid, addr, PAGE, Access.READ)
        await mirror.read(addr, 1)  # hmmd's DMA copies run on a thread of its own
        tids = [int(t) for t in os.listdir(f"/proc/{hmmd.proc.pid}/task")]
        tids.remove(hmmd.proc.pid)
        assert tids, f"hmmd (pid {hmmd.proc.pid}) runs no thread besides its main one"
        with pytest.raises(RemoteError) as info:
            await s.sync_range(tids[0], 0x10000, 0x11000)
    assert info.value.code == ErrorCode.PERMISSION_DENIED and "hmmd itself" in info.value.message


async def test_a_missing_process_is_esrch(hmmd, agent):
    async with agent() as s:
        with pytest.raises(RemoteError) as info:
            await s.mirror(2**22 + 4321, 0x10000, PAGE, Access.READ)
    assert info.value.code == ErrorCode.ESRCH


def test_a_malformed_policy_is_a_configuration_error(tmp_path):
    path = policy_file(str(tmp_path), '[[grant]]\nagents = ["uid:0"]\naccess = ["execute"]\n')
    out = subprocess.run(
        [*HMMD, "run", "--policy", path, "--endpoint", f"ipc://{tmp_path}/h.sock"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    assert "grant 1" in out.stderr and "execute" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_config_checks_the_policy(tmp_path):
    env = dict(os.environ, HMMIRROR_POLICY=policy_file(
        str(tmp_path), '[[grant]]\nagents = ["uid:0"]\nuids = [0]\naccess = ["write"]\n'
    ))  # fmt: skip
    out = subprocess.run([*HMMD, "check-config"], capture_output=True, text=True, timeout=30,
                         env=env)  # fmt: skip
    assert out.returncode == 2 and "needs read" in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    env["HMMIRROR_POLICY"] = os.path.join(os.path.dirname(__file__), "../../deploy/policy.toml")
    out = subprocess.run([*HMMD, "check-config"], capture_output=True, text=True, timeout=30,
                         env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
