"""Policy grants widen the kernel's rule, explicitly, for real other users.

``reader`` is granted read access to ``owner``'s processes; ``inspector`` holds an
``inspect`` grant. Each runs its agent through ``as_user.py`` (SO_PEERCRED is
theirs); the targets are ``owner``'s real processes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hmmirror.client import Access

from .conftest import User
from .test_policy_attacks import as_user, refused, stack_start, started

PAGE = 4096


@pytest.fixture
def users(make_user: Any, hmmd_group: str) -> tuple[User, User, User]:
    """(owner, reader, inspector): three users in the socket group."""
    return (
        make_user(groups=(hmmd_group,)),
        make_user(groups=(hmmd_group,)),
        make_user(groups=(hmmd_group,)),
    )


@pytest.fixture
def hmmd_extra_args(users: tuple[User, User, User], tmp_path: Path) -> list[str]:
    """The policy: reader may read owner's processes; inspector may inspect."""
    owner, reader, inspector = users
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[[grant]]\nagents = ["uid:{reader.uid}"]\nuids = [{owner.uid}]\naccess = ["read"]\n'
        f'[[grant]]\nagents = ["uid:{inspector.uid}"]\naccess = ["inspect"]\n'
    )
    return ["--policy", str(policy)]


async def test_a_read_grant_reads_and_nothing_more(users, hmmd_extra_args, hmmd, agent, puppet):
    owner, reader, inspector = users
    victim = owner.popen(["sleep", "120"])
    page = stack_start(started(victim, "/bin/sleep"))
    outcome = await as_user(
        reader, hmmd.endpoint,
        {"op": "read", "pid": victim.pid, "addr": page},
        {"op": "write", "pid": victim.pid, "addr": page, "byte": 1},
        {"op": "sync", "pid": victim.pid, "addr": page},
        {"op": "read", "pid": puppet.pid, "addr": await puppet.mmap(PAGE)},
    )  # fmt: skip
    read, write, sync, root = outcome
    assert read["ok"], read
    assert [refused(r) for r in (write, sync, root)] == [True] * 3, outcome
    # The owner itself needs no grant for its own process, and the inspector gets no access.
    own = await as_user(owner, hmmd.endpoint, {"op": "write", "pid": victim.pid, "addr": page,
                                               "byte": 2})  # fmt: skip
    inspect_read = await as_user(
        inspector, hmmd.endpoint, {"op": "read", "pid": victim.pid, "addr": page}
    )
    assert own[0]["ok"], own
    assert refused(inspect_read[0]), inspect_read


async def test_an_inspect_grant_sees_every_session(users, hmmd_extra_args, hmmd, agent, puppet):
    _, reader, inspector = users
    addr = await puppet.mmap(PAGE)
    async with agent("root-agent") as s:
        await s.mirror(puppet.pid, addr, PAGE, Access.READ)
        seen, listing = await as_user(
            inspector, hmmd.endpoint, {"op": "status"}, {"op": "inventory"}
        )
        blind = await as_user(reader, hmmd.endpoint, {"op": "inventory"})
    assert seen["value"]["pid"] == hmmd.proc.pid
    assert [m["pid"] for m in listing["value"]["mirrors"]] == [puppet.pid]
    assert listing["value"]["mirrors"][0]["agent"] == "root-agent"
    assert refused(blind[0]), blind


def test_hmmctl_as_a_user_without_rights(users, hmmd_extra_args, hmmd):
    """``hmmctl status`` works for anyone (counters only); ``hmmctl mms`` is one line, exit 1."""
    _, reader, _ = users
    ctl = [sys.executable, "-m", "hmmirror.tools.ctlapp", "--endpoint", hmmd.endpoint]
    status = reader.run([*ctl, "status"])
    assert status.returncode == 0, status.stderr
    assert "invalidations" in status.stdout and "endpoint" not in status.stdout
    mms = reader.run([*ctl, "mms"])
    assert mms.returncode == 1 and mms.stderr.count("\n") == 1, mms.stderr
    assert "inspect grant" in mms.stderr and "Traceback" not in mms.stderr
    assert subprocess.run([*ctl, "mms"], capture_output=True, timeout=30).returncode == 0
