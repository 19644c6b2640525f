"""Issue 11, rows 1, 2, 10 and 11: who may mirror, write, invalidate and list what.

Every attack runs as a real second user in hmmd's socket group (``make_user``,
``hmmd_group``), through ``as_user.py``: the requests reach hmmd with that user's
SO_PEERCRED, as an attacker's would. The victims are real processes: the test's
own (root) puppet, hmmd itself, and a set-uid-root program the user starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hmmirror.client import Access, RemoteError
from hmmirror.proto import ErrorCode

from .conftest import User

PAGE = 4096
AS_USER = str(Path(__file__).with_name("as_user.py"))
#: Keys of ``status`` that name a process, a path or an address: root's alone.
PRIVATE_STATUS = {"pid", "endpoint", "metrics", "zero_pfn", "uffd_last_refusal",
                  "last_acked_monotonic"}  # fmt: skip


async def as_user(user: User, endpoint: str, *steps: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``steps`` in one session of ``user``'s agent; their outcomes."""
    out = await asyncio.to_thread(
        user.run, [sys.executable, AS_USER, endpoint, json.dumps(list(steps))]
    )
    assert out.returncode == 0, f"the user's agent failed: {out.stderr[-2000:]}"
    results: list[dict[str, Any]] = json.loads(out.stdout.splitlines()[-1])
    return results


def started(proc: Any, program: str) -> int:
    """Wait until ``proc`` (a user's, under setpriv) runs ``program``; its pid."""
    deadline = time.monotonic() + 10
    while os.path.realpath(f"/proc/{proc.pid}/exe") != os.path.realpath(program):
        assert proc.poll() is None and time.monotonic() < deadline, f"{program} never started"
        time.sleep(0.01)
    pid: int = proc.pid
    return pid


def stack_start(pid: int) -> int:
    """The lowest page of ``pid``'s [stack]: never in use, so a write there harms nothing."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if line.rstrip().endswith("[stack]"):
                return int(line.split("-")[0], 16)
    raise AssertionError(f"process {pid} has no [stack]")


def peek(pid: int, addr: int) -> bytes:
    """One page of ``pid``'s memory at ``addr``, read by root (the test)."""
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(addr)
        return f.read(PAGE)


@pytest.fixture
def user(make_user: Any, hmmd_group: str) -> User:
    """A real other user who can reach the test's hmmd through the socket group."""
    made: User = make_user(groups=(hmmd_group,))
    return made


@pytest.fixture
def setuid_program(user: User) -> Iterator[tuple[int, Any]]:
    """A set-uid-root program the user started, waiting (like ``su`` at its password prompt):
    real uid the user's, effective and saved uid 0, not dumpable. Yields (pid, process)."""
    directory = tempfile.mkdtemp(prefix="hmms-", dir="/tmp")
    try:
        os.chmod(directory, 0o755)
        program = os.path.join(directory, "suid-sleep")
        shutil.copy("/bin/sleep", program)
        os.chmod(program, 0o4755)
        assert os.stat(program).st_mode & stat.S_ISUID
        proc = user.popen([program, "120"])
        started(proc, program)
        with open(f"/proc/{proc.pid}/status") as f:
            uids = next(line.split()[1:] for line in f if line.startswith("Uid:"))
        if uids != [str(user.uid), "0", "0", "0"]:
            pytest.fail(f"/tmp is mounted nosuid? the program runs with uids {uids}", pytrace=False)
        yield proc.pid, proc
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def refused(result: dict[str, Any]) -> bool:
    """Whether a step was refused with PERMISSION_DENIED."""
    return not result["ok"] and result["code"] == "PERMISSION_DENIED"


# --- row 1: no policy file, a member of the socket group ------------------------------------


async def test_row1_without_a_policy_a_user_mirrors_only_its_own_processes(
    hmmd, user, puppet, setuid_program
):
    """The user's agent tries to write a root process, hmmd's own heap-side stack and a
    set-uid program it started: all refused, nothing written; its own process works."""
    victim = await puppet.mmap(PAGE)
    await puppet.write(victim, b"R" * PAGE)
    hmmd_pid = hmmd.proc.pid
    hmmd_page = stack_start(hmmd_pid)
    hmmd_before = peek(hmmd_pid, hmmd_page)
    suid_pid, _ = setuid_program
    suid_page = stack_start(suid_pid)
    suid_before = peek(suid_pid, suid_page)

    root, itself, suid, own = await as_user(
        user, hmmd.endpoint,
        {"op": "write", "pid": puppet.pid, "addr": victim, "byte": 0x41},
        {"op": "write", "pid": hmmd_pid, "addr": hmmd_page, "byte": 0x42},
        {"op": "write", "pid": suid_pid, "addr": suid_page, "byte": 0x43},
        {"op": "own"},
    )  # fmt: skip

    assert [refused(r) for r in (root, itself, suid)] == [True] * 3, (root, itself, suid)
    assert "hmmd itself" in itself["message"], itself
    assert await puppet.read(victim, PAGE) == b"R" * PAGE
    assert peek(hmmd_pid, hmmd_page) == hmmd_before
    assert peek(suid_pid, suid_page) == suid_before
    assert own["ok"] and own["value"]["landed"], own
    assert hmmd.proc.poll() is None
    log = hmmd.stderr()
    assert "refused register by session" in log and "Traceback" not in log


async def test_hmmd_itself_is_refused_even_to_root(hmmd, agent):
    """No grant and no privilege covers hmmd: root's own agent is refused too."""
    async with agent() as s:
        with pytest.raises(RemoteError) as info:
            await s.mirror(hmmd.proc.pid, stack_start(hmmd.proc.pid), PAGE, Access.READ)
    assert info.value.code == ErrorCode.PERMISSION_DENIED
    assert "hmmd itself" in info.value.message


# --- row 2: a policy granting "uid N may mirror uid N" ---------------------------------------


@pytest.fixture
def uid_grant(user: User, tmp_path: Path) -> str:
    """The policy "uid N may read and write uid N's processes", for the user's uid N."""
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[[grant]]\nagents = ["uid:{user.uid}"]\nuids = [{user.uid}]\naccess = ["read", "write"]\n'
    )
    return str(policy)


@pytest.fixture
def hmmd_extra_args(request: pytest.FixtureRequest) -> list[str]:
    """The hmmd fixture's extra arguments: ``--policy`` for a test that asks for ``uid_grant``."""
    if "uid_grant" not in request.fixturenames:
        return []
    return ["--policy", request.getfixturevalue("uid_grant")]


async def test_row2_a_uid_grant_does_not_cover_a_setuid_root_program(
    user, uid_grant, hmmd, setuid_program
):
    """Granted its own uid, the user still cannot write a set-uid-root program it started:
    the grant is matched against every id (effective and saved are 0) and the dumpable flag."""
    suid_pid, _ = setuid_program
    page = stack_start(suid_pid)
    before = peek(suid_pid, page)

    suid, own = await as_user(
        user, hmmd.endpoint, {"op": "write", "pid": suid_pid, "addr": page, "byte": 0x44},
        {"op": "own"},
    )  # fmt: skip

    assert refused(suid), suid
    assert "uids 0/" in suid["message"] and "not dumpable" in suid["message"], suid
    assert peek(suid_pid, page) == before
    assert own["ok"] and own["value"]["landed"], own


# --- row 10: status and inventory ------------------------------------------------------------


async def test_row10_status_and_inventory_show_a_user_nothing_of_others(hmmd, user, puppet, agent):
    """With root's agent "root-secret-agent" mirroring root's puppet, the user's status has
    counters only, its sessionless inventory is refused, and its session's inventory lists
    its own mirror alone. Root still sees everything."""
    victim = await puppet.mmap(PAGE)
    async with agent("root-secret-agent") as s:
        await s.mirror(puppet.pid, victim, PAGE, Access.READ)
        stats, inv, own, session_inv, session_stats = await as_user(
            user, hmmd.endpoint, {"op": "status"}, {"op": "inventory"}, {"op": "own"},
            {"op": "session_inventory"}, {"op": "session_status"},
        )  # fmt: skip
        root_view = await s.status()

    for view in (stats, session_stats):
        assert view["ok"], view
        assert not PRIVATE_STATUS & set(view["value"]), view["value"]
        assert str(hmmd.proc.pid) not in json.dumps(view["value"])
        assert "root-secret-agent" not in json.dumps(view["value"])
    assert stats["value"]["mirrors"] == 1  # the counters remain
    assert refused(inv), inv
    assert own["ok"], own
    listing = session_inv["value"]
    assert listing["mirrors"][2::8] == [own["value"]["pid"]], listing  # the pid column: its own
    assert listing["mms"][0::6] == [own["value"]["pid"]], listing
    assert "root-secret-agent" not in json.dumps(listing)
    assert puppet.pid not in listing["mms"] + listing["mirrors"]
    assert root_view["pid"] == hmmd.proc.pid  # root inspects


# --- row 11: sync_range on someone else's process -------------------------------------------


async def test_row11_sync_range_needs_write_access_to_the_target(hmmd, user, puppet, agent):
    """The user cannot invalidate root's mirrors of root's process (nothing reaches them);
    it can invalidate its own process."""
    victim = await puppet.mmap(PAGE)
    async with agent("root-agent") as s:
        mirror = await s.mirror(puppet.pid, victim, PAGE, Access.READ)
        await mirror.read(victim, 1)
        before = (await s.status())["invalidations"]
        theirs, mine = await as_user(
            user, hmmd.endpoint, {"op": "sync", "pid": puppet.pid, "addr": victim},
            {"op": "own_sync"},
        )  # fmt: skip
        after = (await s.status())["invalidations"]
    assert refused(theirs), theirs
    assert after == before, "the user's sync_range invalidated root's mirror"
    assert mine["ok"], mine
