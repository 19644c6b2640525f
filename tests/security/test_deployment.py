"""Row 13: the documented deployment mirrors other users' processes, as its policy grants.

``deploy/hmmd.service`` runs hmmd as the unprivileged user ``hmmirror`` with the ambient
capabilities the unit lists. Here hmmd runs exactly so, without systemd: as a throwaway user
(standing for ``hmmirror``, its socket group for the group ``hmmirror``) under ``setpriv`` with
the ``AmbientCapabilities=`` and ``CapabilityBoundingSet=`` read from the unit file, in a 0750
directory of its own like ``RuntimeDirectory=``. The target and the agent are two more real
users. At 6c59ac2 the unit granted CAP_SYS_PTRACE and CAP_SYS_ADMIN only: /proc/PID/pagemap
(mode 0400, the target's user's) stayed closed to hmmd, so a granted mirror of another user's
process failed and hmmd mirrored nobody but itself. ``tests/integration/test_systemd_live.py``
runs the same unit under a real systemd.
"""

from __future__ import annotations

import ctypes
import grp
import json
import mmap
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hmmirror.testing.hmmd import HmmdProcess, HmmdStartError, launch_hmmd

from .conftest import USER_DEADLINE, User

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "hmmd.service"
PAGE = 4096

#: An agent that mirrors each ``label=pid:addr`` given, reads and writes one page, and prints
#: what became of each, as one JSON object.
AGENT = """
import asyncio, json, sys
from hmmirror.client import Access, AgentError, connect

async def main(endpoint, targets):
    out = {}
    async with connect(endpoint, name="row13", timeout=10) as s:
        for item in targets:
            label, _, where = item.partition("=")
            pid, addr = (int(x) for x in where.split(":"))
            try:
                m = await s.mirror(pid, addr, 4096, Access.READ | Access.WRITE)
                r = await m.read(addr, 1)
                page = bytearray(4096)
                page[64:84] = b"written by the agent"
                await m.write(addr, page)
                out[label] = {"ok": True, "head": bytes(r.data[:16]).decode(errors="replace")}
            except AgentError as e:
                out[label] = {"ok": False, "code": str(getattr(e, "code", "")), "error": str(e)}
    print(json.dumps(out), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2:]))
"""

#: A target: one page with a known head, its pid and address on stdout; on a line on stdin it
#: prints what is at offset 64 (where the agent writes) and exits.
TARGET = """
import ctypes, mmap, os, sys
m = mmap.mmap(-1, 4096)
m[:16] = b"row13 target pg."
print(os.getpid(), ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.readline()
print(m[64:84].decode(errors="replace"), flush=True)
"""


def unit_service_settings(path: Path) -> dict[str, list[str]]:
    """The ``[Service]`` assignments of a unit file, each key's values in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def setpriv_caps(names: list[str]) -> str:
    """``CAP_SYS_PTRACE CAP_X`` as setpriv's ``-all,+sys_ptrace,+x``."""
    caps = [n.lower().removeprefix("cap_") for value in names for n in value.split()]
    return ",".join(["-all", *(f"+{c}" for c in caps)])


@pytest.fixture
def deployed_hmmd(
    make_user: Callable[..., User], hmmd_group: str
) -> Iterator[tuple[str, Callable[[], subprocess.Popen[bytes]], list[str]]]:
    """hmmd as the unit runs it: (endpoint, ``start()`` that starts it and returns its
    process, the policy's grants that ``start`` writes first)."""
    settings = unit_service_settings(UNIT)
    assert settings["User"] == ["hmmirror"], "the unit's user is the one this test stands in for"
    daemon_user = make_user(groups=(hmmd_group,))
    directory = tempfile.mkdtemp(prefix="hmm13-", dir="/tmp")
    # As RuntimeDirectory= makes it: the unit's User= and Group= (the socket's group), 0750.
    os.chown(directory, daemon_user.uid, grp.getgrnam(hmmd_group).gr_gid)
    os.chmod(directory, 0o750)
    policy = os.path.join(directory, "policy.toml")
    grants: list[str] = []
    endpoint = f"ipc://{directory}/hmmd.sock"
    ambient = setpriv_caps(settings["AmbientCapabilities"])
    bounding = setpriv_caps(settings["CapabilityBoundingSet"])
    # Nice= is systemd's to set, as root before the user and capabilities change: nice(1)'s.
    renice = int(settings["Nice"][0]) - os.getpriority(os.PRIO_PROCESS, 0)
    setpriv = [
        "nice", "-n", str(renice),
        "setpriv", f"--reuid={daemon_user.uid}", f"--regid={daemon_user.gid}", "--init-groups",
        f"--inh-caps={ambient}", f"--ambient-caps={ambient}", f"--bounding-set={bounding}", "--",
    ]  # fmt: skip
    state: dict[str, HmmdProcess] = {}

    def as_the_unit(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*setpriv, *argv], **kwargs)

    def start() -> subprocess.Popen[bytes]:
        with open(policy, "w") as f:
            f.write("\n".join(grants) + "\n")
        os.chmod(policy, 0o644)
        launched = launch_hmmd(
            endpoint, ["--socket-group", hmmd_group, "--policy", policy],
            log_path=os.path.join(directory, "hmmd.stderr"), spawn=as_the_unit,
        )  # fmt: skip
        state["hmmd"] = launched
        try:
            launched.wait_ready(USER_DEADLINE)
        except HmmdStartError as e:
            raise AssertionError(str(e)) from None
        return launched.proc

    try:
        yield endpoint, start, grants
    finally:
        launched = state.get("hmmd")
        if launched is not None:
            launched.stop(10)
            sys.stderr.write(f"--- hmmd stderr ---\n{launched.log()}--- end ---\n")
        shutil.rmtree(directory, ignore_errors=True)


def start_target(user: User) -> tuple[subprocess.Popen[str], int, int]:
    """A target process of ``user``: (process, pid, address of its page)."""
    proc = user.popen(User.python(TARGET))
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert len(line) == 2, f"the target did not start: {proc.stderr.read() if proc.stderr else ''}"
    return proc, int(line[0]), int(line[1])


def agent_run(agent: User, endpoint: str, targets: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Run the agent as ``agent`` over ``targets`` ({label: (pid, addr)}); its JSON answer."""
    args = [f"{label}={pid}:{addr}" for label, (pid, addr) in targets.items()]
    out = agent.run(User.python(AGENT, endpoint, *args), timeout=USER_DEADLINE)
    assert out.returncode == 0, out.stderr[-2000:]
    answer: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return answer


def thread_nices(pid: int) -> set[int]:
    """The nice values of every thread of ``pid``."""
    tasks = os.listdir(f"/proc/{pid}/task")
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in tasks}


def zmq_policies(pid: int) -> set[int]:
    """The scheduling policies of ``pid``'s libzmq threads (``ZMQbg/...``), which
    ``transport.sockets.context`` asks to be SCHED_BATCH."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().startswith("ZMQbg/"):
            found.add(os.sched_getscheduler(int(task.name)))
    return found


def test_the_unit_user_and_capabilities_mirror_a_granted_other_users_process(
    deployed_hmmd: Any, make_user: Callable[..., User], hmmd_group: str
) -> None:
    endpoint, start, grants = deployed_hmmd
    target_user = make_user()
    agent = make_user(groups=(hmmd_group,))
    stranger = make_user(groups=(hmmd_group,))
    grants.append(f'[[grant]]\nagents = ["uid:{agent.uid}"]\nuids = [{target_user.uid}]\n'
                  'access = ["read", "write"]')  # fmt: skip
    hmmd = start()
    target, pid, addr = start_target(target_user)
    # A page of root's (this test's own process), which no grant covers.
    root_page = mmap.mmap(-1, PAGE)
    root_page[:16] = b"root's own page."
    root_addr = ctypes.addressof(ctypes.c_char.from_buffer(root_page))
    try:
        answer = agent_run(
            agent, endpoint,
            {"granted": (pid, addr), "root": (os.getpid(), root_addr), "hmmd": (hmmd.pid, 0)},
        )  # fmt: skip
        # The grant works through hmmd's own user and the unit's capabilities: read and write.
        assert answer["granted"] == {"ok": True, "head": "row13 target pg."}, answer
        assert target.stdin is not None and target.stdout is not None
        target.stdin.write("report\n")
        target.stdin.flush()
        assert target.stdout.readline().strip() == "written by the agent"
        # Nothing else: root's process and hmmd itself are refused.
        for label in ("root", "hmmd"):
            assert answer[label]["ok"] is False, answer
            assert "PERMISSION_DENIED" in answer[label]["error"], answer
        # A member of the socket group without a grant gets nothing of the target either.
        _, pid2, addr2 = start_target(target_user)
        refused = agent_run(stranger, endpoint, {"target": (pid2, addr2)})
        assert refused["target"]["ok"] is False, refused
        assert "PERMISSION_DENIED" in refused["target"]["error"], refused
        assert root_page[64:84] != b"written by the agent"
        assert hmmd.poll() is None, "hmmd still serves"
        # Every thread, libzmq's and the copy thread among them, runs at the unit's Nice=,
        # which hmmd (without CAP_SYS_NICE, setpriority filtered) left as it found it.
        nice = int(unit_service_settings(UNIT)["Nice"][0])
        assert nice < 0 and thread_nices(hmmd.pid) == {nice}, thread_nices(hmmd.pid)
        # libzmq's threads run under SCHED_BATCH: the unit's filter lets that through.
        assert zmq_policies(hmmd.pid) == {os.SCHED_BATCH}, zmq_policies(hmmd.pid)
        log = Path(endpoint.removeprefix("ipc://")).with_name("hmmd.stderr").read_text()
        assert "cannot run at nice" not in log, log
    finally:
        root_page.close()


def test_an_hmmd_that_may_not_raise_its_priority_says_so_once_and_serves(
    make_user: Callable[..., User], tmp_path: Path
) -> None:
    """Run by hand as a user without CAP_SYS_NICE (no unit to set Nice=), hmmd cannot reach
    its default nice of -10: it says so in one warning and serves at the nice it has."""
    user = make_user()
    directory = tempfile.mkdtemp(prefix="hmmnice-", dir="/tmp")  # pytest's tmp_path is 0700
    os.chown(directory, user.uid, user.gid)
    endpoint = f"ipc://{directory}/hmmd.sock"
    launched = launch_hmmd(
        endpoint, [], log_path=str(tmp_path / "hmmd.stderr"),
        spawn=lambda argv, **kw: subprocess.Popen(user.argv(*argv), **kw),
    )  # fmt: skip
    try:
        launched.wait_ready(USER_DEADLINE)
        out = user.run([sys.executable, "-m", "hmmirror.tools.ctlapp", "--endpoint", endpoint,
                        "status"])  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert thread_nices(launched.proc.pid) == {os.getpriority(os.PRIO_PROCESS, 0)}
        # SCHED_BATCH for libzmq's threads needs no privilege.
        assert zmq_policies(launched.proc.pid) == {os.SCHED_BATCH}
        warned = [ln for ln in launched.log().splitlines() if "cannot run at nice" in ln]
        assert len(warned) == 1 and " warning " in warned[0], launched.log()
        assert "cannot run at nice -10 (Permission denied" in warned[0], warned
    finally:
        launched.stop(10)
        shutil.rmtree(directory, ignore_errors=True)


#: hmmd's part in COW breaks, as the unit's user: write-fault a target's 4 pages through the
#: injector, over and over, until stdin closes.
COW_BREAKER = """
import os, sys, threading
from hmmirror.daemon.linux import injector
pid, addr = int(sys.argv[1]), int(sys.argv[2])
pidfd = os.pidfd_open(pid)
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
injector.populate_write(pid, pidfd, [(addr, 4 * 4096)])
print("ready", flush=True)
while not done.is_set():
    injector.populate_write(pid, pidfd, [(addr, 4 * 4096)])
injector.INJECTORS.close()
"""

#: A target of 4 private pages not yet touched that answers each SIGUSR1 with a line, mostly
#: asleep in a system call. Prints its pid and the pages' address.
SIGNALLED = """
import ctypes, mmap, os, signal, time
m = mmap.mmap(-1, 4 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
signal.signal(signal.SIGUSR1, lambda *_: os.write(1, b"usr1\\n"))
print(os.getpid(), ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
while True:
    time.sleep(0.001)
"""


def test_signals_reach_another_users_target_through_cow_breaks_under_the_units_capabilities(
    make_user: Callable[..., User],
) -> None:
    """A signal that arrives while the injector holds the target is suppressed, then sent
    again once it lets go: with the unit's capabilities, for another user's target. Without
    CAP_KILL the injector (the unit's user) could not send it again, and it was lost."""
    settings = unit_service_settings(UNIT)
    daemon_user, target_user = make_user(), make_user()
    ambient = setpriv_caps(settings["AmbientCapabilities"])
    bounding = setpriv_caps(settings["CapabilityBoundingSet"])
    target = subprocess.Popen(target_user.argv(*User.python(SIGNALLED)), stdout=subprocess.PIPE)
    target_user.procs.append(target)  # type: ignore[arg-type]  # killed at teardown
    assert target.stdout is not None
    pid, addr = (int(x) for x in target.stdout.readline().split())
    breaker = subprocess.Popen(
        ["setpriv", f"--reuid={daemon_user.uid}", f"--regid={daemon_user.gid}", "--init-groups",
         f"--inh-caps={ambient}", f"--ambient-caps={ambient}", f"--bounding-set={bounding}", "--",
         *User.python(COW_BREAKER, str(pid), str(addr))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    daemon_user.procs.append(breaker)
    assert breaker.stdout is not None and breaker.stdin is not None
    line = breaker.stdout.readline().strip()
    assert line == "ready", f"the COW breaker failed: {line or breaker.stderr.read()}"
    fd = target.stdout.fileno()
    for i in range(60):
        time.sleep((i % 7) * 0.0003)
        os.kill(pid, signal.SIGUSR1)
        ready = select.select([fd], [], [], 5.0)[0]
        assert ready and os.read(fd, 5) == b"usr1\n", f"signal {i} never reached the target"
    breaker.stdin.close()
    assert breaker.wait(USER_DEADLINE) == 0, breaker.stderr.read() if breaker.stderr else ""
