"""The policy's decisions over plain data: the kernel's ptrace rule, Yama, grants, parsing.

``hmmirror.daemon.policy`` decides on ``Creds`` values; the /proc readers that
fill them are exercised against real processes at the end of this file and, end to
end, by ``tests/security/test_policy_attacks.py``.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hmmirror.daemon.linux.creds import CAP_SYS_PTRACE, Creds, read_agent_creds, read_creds
from hmmirror.daemon.policy import (
    Agent,
    Host,
    Policy,
    PolicyError,
    kernel_refusal,
    own_process,
    refusal,
    yama_refusal,
)
from hmmirror.proto.messages import Access
from hmmirror.transport.peer import Peer

NS = 4026531837
HOST = Host(hmmd_pid=10, userns=NS)
RW = Access.READ | Access.WRITE
KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


def creds(pid: int = 500, uids: tuple[int, ...] = (1000,), gids: tuple[int, ...] = (1000,),
          **kw: object) -> Creds:  # fmt: skip
    """A dumpable, capability-less process of uid/gid 1000 unless told otherwise."""
    fields: dict[str, object] = {"dumpable": True, "userns": NS, "exe": "/usr/bin/app",
                                 "cgroup": "/system.slice/app.service"}  # fmt: skip
    fields.update(kw)
    return Creds(pid, 1, frozenset(uids), frozenset(gids), **fields)  # type: ignore[arg-type]


def local(uid: int = 1000, gid: int = 1000, pid: int = 400, **kw: object) -> Agent:
    """An ipc agent whose process has the given ids (and ``kw`` credentials)."""
    return Agent(Peer(uid=uid, gid=gid, pid=pid), creds(pid, (uid,), (gid,), **kw))


def policy(tmp_path: Path, body: str) -> Policy:
    """Load ``body`` as a policy file."""
    path = tmp_path / "policy.toml"
    path.write_text(body)
    return Policy.load(str(path))


# --- the kernel's rule ------------------------------------------------------------------------


def test_an_agent_may_mirror_a_process_with_all_its_ids() -> None:
    assert refusal(None, local(), creds(), RW, HOST) is None


@pytest.mark.parametrize(
    ("target", "why"),
    [
        (creds(uids=(1000, 0)), "ids are not all the agent's"),  # a set-uid-root program
        (creds(gids=(1000, 5)), "ids are not all the agent's"),  # set-gid
        (creds(uids=(1001,)), "ids are not all the agent's"),
        (creds(dumpable=False), "not dumpable"),
        (creds(cap_prm=1 << 12), "capabilities the agent lacks"),
        (creds(userns=NS + 1), "another user namespace"),
    ],
)
def test_the_kernel_rule_refuses(target: Creds, why: str) -> None:
    text = refusal(None, local(), target, Access.READ, HOST)
    assert text is not None and why in text and "no policy file grants more" in text
    assert "\n" not in text


def test_capabilities_the_agent_holds_too_are_fine() -> None:
    agent = local(cap_prm=(1 << 12) | (1 << 13))
    assert refusal(None, agent, creds(cap_prm=1 << 12), RW, HOST) is None


def test_root_over_ipc_and_cap_sys_ptrace_are_privileged() -> None:
    root_target = creds(uids=(0,), gids=(0,), dumpable=False, cap_prm=(1 << 41) - 1)
    assert refusal(None, local(uid=0, gid=0), root_target, RW, HOST) is None
    tracer = local(cap_eff=1 << CAP_SYS_PTRACE)
    assert refusal(None, tracer, root_target, RW, HOST) is None
    # CAP_SYS_PTRACE in a user namespace of its own says nothing about hmmd's.
    contained = local(cap_eff=1 << CAP_SYS_PTRACE, userns=NS + 7)
    assert refusal(None, contained, root_target, RW, HOST) is not None


def test_an_agent_whose_credentials_were_not_proven_gets_only_root_rights() -> None:
    unproven = Agent(Peer(uid=1000, gid=1000, pid=400), None)
    assert "could not be proven" in (kernel_refusal(unproven, creds(), HOST) or "")


def test_a_tcp_agent_gets_nothing_without_a_grant() -> None:
    for peer in (Peer(curve_key=KEY), Peer()):
        assert "tcp:// agent" in (refusal(None, Agent(peer), creds(), Access.READ, HOST) or "")


def test_hmmd_itself_is_refused_to_everyone(tmp_path: Path) -> None:
    everything = policy(
        tmp_path, '[[grant]]\nagents = ["any"]\nprivileged = true\naccess = ["read", "write"]\n'
    )
    me = creds(pid=HOST.hmmd_pid, uids=(0,), gids=(0,))
    for agent in (local(uid=0, gid=0), local(cap_eff=-1), Agent(Peer(curve_key=KEY))):
        assert "hmmd itself" in (refusal(everything, agent, me, Access.READ, HOST) or "")


def test_own_process_is_the_hello_process_by_pid_and_start_time() -> None:
    agent = local(pid=400)  # creds(400, ...) start at 1
    assert own_process(agent, 400, 1)
    assert not own_process(agent, 400, 2)  # the pid was reused since hello
    assert not own_process(agent, 401, 1)
    assert not own_process(Agent(Peer(uid=1000, gid=1000, pid=400), None), 400, 1)


# --- Yama ---------------------------------------------------------------------------------------


def yama(scope: int) -> Host:
    """hmmd's host under Yama ``scope``."""
    return replace(HOST, yama=scope)


def test_yama_scope_1_wants_a_descendant_of_the_agent() -> None:
    agent = local(pid=400)
    child = creds(pid=600, ancestors=(400, 1))
    stranger = creds(pid=601, ancestors=(300, 1))
    assert yama_refusal(agent, child, yama(1)) is None
    assert yama_refusal(agent, creds(pid=400), yama(1)) is None  # itself
    assert "descendant" in (yama_refusal(agent, stranger, yama(1)) or "")
    assert refusal(None, agent, stranger, Access.READ, yama(1)) is not None
    assert yama_refusal(local(uid=0, gid=0), stranger, yama(1)) is None


def test_yama_scope_2_admits_privileged_agents_only() -> None:
    assert "scope 2" in (yama_refusal(local(), creds(), yama(2)) or "")
    assert yama_refusal(local(cap_eff=1 << CAP_SYS_PTRACE), creds(), yama(2)) is None
    assert yama_refusal(local(uid=0, gid=0), creds(), yama(2)) is None


def test_yama_scope_3_stops_everyone(tmp_path: Path) -> None:
    grant = policy(tmp_path, '[[grant]]\nagents = ["any"]\naccess = ["read"]\n')
    for agent in (local(), local(uid=0, gid=0)):
        assert "scope 3" in (refusal(grant, agent, creds(), Access.READ, yama(3)) or "")


def test_yama_scope_0_adds_nothing() -> None:
    assert yama_refusal(local(), creds(pid=601, ancestors=(300, 1)), yama(0)) is None


# --- grants ------------------------------------------------------------------------------------


def test_a_grant_widens_the_rule_for_the_agent_it_names(tmp_path: Path) -> None:
    p = policy(tmp_path, '[[grant]]\nagents = ["uid:1001"]\nuids = [1000]\naccess = ["read"]\n')
    assert refusal(p, local(uid=1001, gid=1001), creds(), Access.READ, HOST) is None
    assert refusal(p, local(uid=1001, gid=1001), creds(), RW, HOST) is not None  # read only
    assert refusal(p, local(uid=1002, gid=1002), creds(), Access.READ, HOST) is not None


def test_a_uid_grant_matches_every_id_never_only_the_real_uid(tmp_path: Path) -> None:
    p = policy(
        tmp_path, '[[grant]]\nagents = ["uid:1000"]\nuids = [1000]\naccess = ["read", "write"]\n'
    )
    su = creds(uids=(1000, 0), dumpable=False, cap_prm=(1 << 41) - 1)  # su at its prompt
    text = refusal(p, local(), su, RW, HOST)
    assert text is not None and "no grant covers it" in text and "uids 0/1000" in text


def test_privileged_grants_cover_undumpable_and_capable_targets(tmp_path: Path) -> None:
    plain = policy(tmp_path, '[[grant]]\nagents = ["uid:1001"]\naccess = ["read"]\n')
    wide = policy(
        tmp_path, '[[grant]]\nagents = ["uid:1001"]\nprivileged = true\naccess = ["read"]\n'
    )
    agent = local(uid=1001, gid=1001)
    for target in (creds(dumpable=False), creds(cap_prm=1)):
        assert refusal(plain, agent, target, Access.READ, HOST) is not None
        assert refusal(wide, agent, target, Access.READ, HOST) is None


def test_gids_exes_and_cgroups_narrow_a_grant(tmp_path: Path) -> None:
    p = policy(
        tmp_path,
        f'[[grant]]\nagents = ["curve:{KEY}"]\ngids = [1000]\nexes = ["/usr/bin/app"]\n'
        'cgroups = ["/system.slice/"]\naccess = ["read"]\n',
    )
    agent = Agent(Peer(curve_key=KEY))
    assert refusal(p, agent, creds(), Access.READ, HOST) is None
    for target in (creds(gids=(1000, 0)), creds(exe="/bin/sh"), creds(cgroup="/user.slice/x"),
                   creds(cgroup="/system.slicex/y")):  # fmt: skip
        assert refusal(p, agent, target, Access.READ, HOST) is not None


def test_inspect_and_physical_frames_are_session_rights(tmp_path: Path) -> None:
    p = policy(
        tmp_path,
        '[[grant]]\nagents = ["uid:1001"]\naccess = ["inspect"]\n'
        '[[grant]]\nagents = ["uid:1002"]\nuids = [7]\naccess = ["read"]\nframes = "physical"\n',
    )
    assert p.inspector("uid:1001") and not p.inspector("uid:1002")
    assert p.physical_frames("uid:1002") and not p.physical_frames("uid:1001")
    # an inspect-only grant gives no access to any process
    assert refusal(p, local(uid=1001, gid=1001), creds(), Access.READ, HOST) is not None


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ('[[grant]]\nagents = ["uid:0"]\naccess = ["execute"]\n', "execute"),
        ('[[grant]]\nagents = ["uid:0"]\n', "access is required"),
        ('[[grant]]\nagents = ["uid:0"]\naccess = ["write"]\n', "needs read"),
        ('[[grant]]\nagents = ["root"]\naccess = ["read"]\n', "agents must list"),
        ('[[grant]]\nagents = ["uid:0"]\nuids = ["0"]\naccess = ["read"]\n', "uids must"),
        ('[[grant]]\nagents = ["uid:0"]\nprivileged = "yes"\naccess = ["read"]\n', "privileged"),
        ('[[grant]]\nagents = ["uid:0"]\nframes = "pfn"\naccess = ["read"]\n', "frames"),
        ('[[grant]]\nagents = ["uid:0"]\nuid = [0]\naccess = ["read"]\n', "unknown keys"),
        ('[grants]\nagents = ["uid:0"]\n', "unknown tables"),
        ("[[grant]\n", "policy.toml"),
    ],
)
def test_a_malformed_policy_names_the_grant_and_the_key(
    tmp_path: Path, body: str, complaint: str
) -> None:
    with pytest.raises(PolicyError) as info:
        policy(tmp_path, body)
    assert complaint in str(info.value)


def test_the_sample_policy_is_valid() -> None:
    sample = Path(__file__).resolve().parents[2] / "deploy" / "policy.toml"
    assert Policy.load(str(sample)).grants


def test_refusals_are_logged_at_most_a_burst_per_window(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import time

    from hmmirror.daemon.logfmt import Limited

    refusals = Limited(logging.getLogger("hmmirror.daemon.authz"), "refusals", 2, 0.05)
    with caplog.at_level("WARNING", logger="hmmirror.daemon.authz"):
        for i in range(5):
            refusals.warning(f"refused {i}")
        time.sleep(0.06)
        refusals.warning("refused later")
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0", "refused 1", "3 more refusals were not logged", "refused later",
    ]  # fmt: skip


# --- the /proc readers, on real processes ---------------------------------------------------


def test_read_creds_of_this_process() -> None:
    me = read_creds(os.getpid(), ancestry=True)
    assert me.pid == os.getpid() and os.getuid() in me.uids
    assert me.ancestors and me.ancestors[0] == os.getppid()
    assert me.exe == os.path.realpath(f"/proc/{os.getpid()}/exe")


def test_a_thread_id_resolves_to_its_process() -> None:
    import threading

    tids: list[int] = []
    done = threading.Event()
    worker = threading.Thread(target=lambda: (tids.append(threading.get_native_id()), done.wait()))
    worker.start()
    try:
        while not tids:
            done.wait(0.001)
        assert read_creds(tids[0]).pid == os.getpid()
    finally:
        done.set()
        worker.join()


def test_an_undumpable_process_reads_as_not_dumpable() -> None:
    if os.geteuid() != 0:
        pytest.skip("starts a process as uid 65534: needs root (CI runs as root)")
    code = "import ctypes, sys; ctypes.CDLL(None).prctl(4, 0); print(1, flush=True); " + (
        "sys.stdin.read()"
    )
    for undumpable in (False, True):
        run = code if undumpable else code.replace("prctl(4, 0)", "prctl(4, 1)")
        with subprocess.Popen([sys.executable, "-c", run], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, user=65534, group=65534) as proc:  # fmt: skip
            try:
                assert proc.stdout is not None and proc.stdout.readline()
                got = read_creds(proc.pid)
                assert got.uids == {65534} and got.dumpable is not undumpable
            finally:
                proc.kill()


def test_a_root_process_never_reads_as_dumpable() -> None:
    assert os.geteuid() != 0 or not read_creds(os.getpid()).dumpable


def test_read_agent_creds_checks_the_peer_credentials() -> None:
    uid, gid = os.geteuid(), os.getegid()
    assert read_agent_creds(os.getpid(), uid, gid) is not None
    assert read_agent_creds(os.getpid(), uid + 1, gid) is None
    assert read_agent_creds(2**22 + 12345, uid, gid) is None  # no such process


def test_read_agent_creds_works_when_the_pidfd_is_numbered_above_1023() -> None:
    """hmmd raises its descriptor limit and holds thousands: select(2) would raise ValueError."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low to hold 1100 descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = []
    try:
        while len(held) < 1100:  # push the next free descriptor number past 1023
            held.append(os.open("/dev/null", os.O_RDONLY))
        uid, gid = os.geteuid(), os.getegid()
        assert read_agent_creds(os.getpid(), uid, gid) is not None
        pidfd = os.pidfd_open(os.getpid())
        try:
            assert pidfd > 1023
            assert read_agent_creds(os.getpid(), uid, gid, pidfd) is not None
        finally:
            os.close(pidfd)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
