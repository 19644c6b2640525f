"""Issue 11, rows 4, 5, 7, 8 and 12: hostile peers against hmmd's (and hm-agent's) sockets.

Every attack runs as a raw ZeroMQ peer, a raw Unix socket, or a real other user,
against a real daemon:

- row 4: peers that pre-claim the routing ids libzmq would give the next honest
  connection (with an unseeded ``rand()`` they are the same in every process):
  the honest connection must not abort hmmd or hm-agent;
- row 5: a new connection that presents a disconnected peer's routing id within
  the lease must not inherit its session;
- row 7: hundreds of connections under a 1024-descriptor limit must not abort
  hmmd, and a witness is still served;
- row 8: userfaultfd offers from many short-lived processes must not pin hmmd's
  descriptors: REGISTER keeps working;
- row 12: a second hmmd on the endpoint of a live one exits 2 with one line; the
  socket is removed on exit; SIGHUP rereads the policy and does not kill hmmd.

Each attack is written so it can also run against an hmmirror from before the
transport (plain ``connect``), where it succeeded.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from hmmirror.client import Access, RemoteError, connect
from hmmirror.client.session import status
from hmmirror.proto import ErrorCode, decode, encode
from hmmirror.proto import messages as M
from hmmirror.testing import hmmd as launcher
from hmmirror.testing.hmmd import HmmdProcess

PAGE = 4096
HMMD = [sys.executable, "-m", "hmmirror.daemon", "run"]
#: libzmq numbers a ROUTER's anonymous peers from ``rand()``: unseeded, the first id is
#: 0x6b8b4567 (glibc's first value), and each connection takes the next.
PREDICTED = [b"\x00" + struct.pack(">I", 0x6B8B4567 + i) for i in range(64)]


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """A short directory under /tmp that other users can traverse (tmp_path's parents are
    private to root), removed afterwards."""
    directory = tempfile.mkdtemp(prefix="hmsec-", dir="/tmp")
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def fd_count(pid: int) -> int:
    """How many descriptors process ``pid`` holds."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def raw_dealer(ctx: zmq.Context[Any], endpoint: str, routing_id: bytes | None) -> Any:
    """A DEALER that connects the way a plain ZeroMQ peer would, presenting ``routing_id``."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.connect(endpoint)
    return sock


def knocked_dealer(ctx: zmq.Context[Any], endpoint: str, routing_id: bytes) -> Any:
    """A DEALER that knocks at the door as clients do, presenting ``routing_id`` in its
    handshake (None where there is no door: an hmmirror from before the transport)."""
    try:
        from hmmirror.transport import Dialer
    except ImportError:
        return None
    dialer = Dialer(ctx, endpoint, options={zmq.ROUTING_ID: routing_id})
    dialer.dial_sync(5.0)
    return dialer.sock


def ask(sock: Any, msg: M.Message, msg_id: int, timeout: float = 2.0) -> Any:
    """One request on a blocking socket; the reply's envelope, or None in ``timeout``."""
    try:
        sock.send_multipart(encode(msg, msg_id), zmq.NOBLOCK)
    except zmq.Again:
        return None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            return None
        env = decode(sock.recv_multipart())
        if env.re == msg_id:
            return env
    return None


# --- row 4: pre-claimed routing ids ---------------------------------------------------------------


#: As another user: claim the predicted routing ids with raw DEALERs (and, where there
#: is a door, with knocked ones presenting them), say so, hold them until stdin closes.
CLAIMS = r"""
import struct, sys, zmq
endpoint = sys.argv[1]
predicted = [b"\x00" + struct.pack(">I", 0x6B8B4567 + i) for i in range(64)]
ctx, socks = zmq.Context(), []
for rid in predicted:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.setsockopt(zmq.ROUTING_ID, rid)
    s.connect(endpoint)
    socks.append(s)
try:
    from hmmirror.transport import Dialer
except ImportError:
    Dialer = None
for rid in predicted[:8] if Dialer else []:
    d = Dialer(ctx, endpoint, options={zmq.ROUTING_ID: rid})
    d.dial_sync(5.0)
    socks.append(d.sock)
print("claimed", flush=True)
sys.stdin.read()
"""


async def test_row4_preclaimed_routing_ids_cannot_abort_hmmd(
    hmmd_group, hmmd, puppet, agent, make_user
):
    attacker = make_user(groups=(hmmd_group,))
    claims = attacker.popen(attacker.python(CLAIMS, hmmd.endpoint))
    assert claims.stdout is not None and claims.stdin is not None
    line = await asyncio.wait_for(asyncio.to_thread(claims.stdout.readline), 60)
    assert line.strip() == "claimed", claims.stderr.read() if claims.stderr else ""
    try:
        await asyncio.sleep(0.5)  # every claim connected (or was turned away)
        addr = await puppet.mmap(PAGE)
        await puppet.write(addr, b"honest")
        for _ in range(3):  # each honest connection would take the next predicted id
            async with agent("honest") as s:
                mirror = await s.mirror(puppet.pid, addr, PAGE, Access.READ)
                assert (await mirror.read(addr, 1)).data[:6] == b"honest"
        assert hmmd.proc.poll() is None, "hmmd died"
        assert "Assertion failed" not in hmmd.stderr()
    finally:
        claims.stdin.close()
        claims.wait(30)


async def test_row4_preclaimed_routing_ids_cannot_abort_hm_agent(hmmd, puppet):
    from hmmirror.testing.rdma import hm_agent

    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"honest")
    async with hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{PAGE}:r") as nic:
        ctx = zmq.Context()
        claims = [raw_dealer(ctx, nic.endpoint, rid) for rid in PREDICTED]
        try:
            await asyncio.sleep(0.5)
            for _ in range(3):
                async with nic.peer() as peer:
                    assert bytes(await peer.read(nic.rkeys[0], addr, 6)) == b"honest"
            assert nic.proc.returncode is None, "hm-agent died"
            assert b"Assertion failed" not in nic.errors
        finally:
            for sock in claims:
                sock.close(0)
            ctx.term()


# --- row 5: a routing id is not a session ---------------------------------------------------------


async def test_row5_a_new_connection_presenting_a_gone_peers_id_gets_no_session(hmmd, puppet):
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"the victim's page")
    ctx = zmq.Context()
    try:
        # The victim: the daemon's first connection (with the old transport, routing id
        # PREDICTED[0]), a session and a mirror, then gone without GOODBYE.
        async with connect(hmmd.endpoint, name="victim") as victim:
            mirror = await victim.mirror(puppet.pid, addr, PAGE, Access.READ)
            mirror_id = mirror.id
            await mirror.read(addr, 1)
            victim._close_socket()  # vanish: no goodbye, the session's lease still runs
            victim.welcome = None  # (so close() does not try a GOODBYE)
        fault = M.Fault(mirror=mirror_id, start=addr, npages=1, write=False, mode=1, read=True)
        served = []
        for n, how in enumerate(("raw", "knocked")):
            if how == "raw":
                sock = raw_dealer(ctx, hmmd.endpoint, PREDICTED[0])
            else:
                sock = knocked_dealer(ctx, hmmd.endpoint, PREDICTED[0])
                if sock is None:
                    continue
            try:
                reply = ask(sock, fault, 100 + n)
                if reply is not None and not isinstance(reply.msg, M.Error):
                    served.append((how, reply.type))
                if reply is not None and isinstance(reply.msg, M.Error):
                    assert reply.msg.code == ErrorCode.NO_SESSION, reply.msg
            finally:
                sock.close(0)
        assert not served, f"a stranger inherited the victim's session: {served}"
        assert hmmd.proc.poll() is None
    finally:
        ctx.term()


# --- row 7: descriptors ---------------------------------------------------------------------------


def start_hmmd(directory: str, nofile: int, *args: str) -> tuple[HmmdProcess, str]:
    """An hmmd under ``prlimit --nofile=N:N`` (it cannot raise the limit), and its endpoint."""
    endpoint = f"ipc://{directory}/hmmd.sock"

    def under_prlimit(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["prlimit", f"--nofile={nofile}:{nofile}", *argv], **kwargs)

    try:
        proc = launcher.start_hmmd(
            endpoint, ["--heartbeat", "200ms", *args], log_path=f"{directory}/hmmd.stderr",
            spawn=under_prlimit,
        )  # fmt: skip
    except launcher.HmmdStartError as e:
        raise AssertionError(str(e)) from None
    return proc, endpoint


def stop_hmmd(proc: HmmdProcess) -> str:
    """SIGTERM hmmd (SIGKILL after 10 s); its stderr."""
    proc.stop(10)
    return proc.log()


#: As another user: open N channels the way clients do and N raw connections to the
#: socket, hold them, say how many of each got through, then wait for stdin to close.
FLOOD = r"""
import json, socket, sys, zmq
path, n = sys.argv[1], int(sys.argv[2])
ctx, channels, denied = zmq.Context(), [], 0
try:
    from hmmirror.transport import Dialer, DoorError
except ImportError:
    Dialer = None
for _ in range(n if Dialer else 0):
    d = Dialer(ctx, "ipc://" + path)
    try:
        d.dial_sync(5.0)
        channels.append(d)
    except DoorError:
        denied += 1
        d.close()
raw, refused = [], 0
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        raw.append(s)
    except OSError:
        refused += 1
print(json.dumps({"channels": len(channels), "channels_denied": denied, "raw": len(raw),
                  "raw_refused": refused}), flush=True)
sys.stdin.read()
"""


async def test_row7_a_connection_flood_under_a_1024_descriptor_limit_never_aborts_hmmd(
    shared_dir, make_user, make_group
):
    group = make_group()
    proc, endpoint = start_hmmd(
        shared_dir, 1024, "--socket-group", group, "--max-connections-per-peer", "32"
    )
    attacker = make_user(groups=(group,))
    try:
        before = fd_count(proc.pid)
        flood = attacker.popen(attacker.python(FLOOD, endpoint[len("ipc://") :], "1100"))
        assert flood.stdout is not None
        got = await asyncio.wait_for(asyncio.to_thread(flood.stdout.readline), 120)
        assert got, f"the flood failed: {flood.stderr.read() if flood.stderr else ''}"
        peak = fd_count(proc.pid)
        assert proc.returncode is None, f"hmmd died under the flood: {stop_hmmd(proc)[-2000:]}"
        # A witness (root) is still served while the attacker holds everything it got.
        async with connect(endpoint, name="witness") as s:
            assert (await s.status())["sessions"] >= 1
        assert flood.stdin is not None
        flood.stdin.close()
        flood.wait(30)
        print(f"\nrow 7: {got.strip()}; hmmd fds {before} before, {peak} at the peak (limit 1024)")
        held = json.loads(got)
        if "channels" in held and held["channels_denied"]:  # the transport's caps
            assert held["channels"] == 32, f"the per-peer cap (32) did not hold: {held}"
        assert peak < 1024 - 64, "hmmd came within its headroom of the descriptor limit"
    finally:
        err = stop_hmmd(proc)
    assert "Assertion failed" not in err and "Too many open files (src/" not in err


# --- row 8: userfaultfd offers --------------------------------------------------------------------

#: As another user: fork N short-lived children that each offer hmmd a userfaultfd and exit.
OFFERS = r"""
import os, sys
from hmmirror.client import DaemonUnavailable
from hmmirror.client.target import expose
endpoint, n = sys.argv[1], int(sys.argv[2])
refused = 0
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        try:
            expose(endpoint, timeout=5)
        except (DaemonUnavailable, OSError):
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    refused += os.waitstatus_to_exitcode(status) == 3
print(refused, flush=True)
"""


async def test_row8_offers_of_short_lived_processes_do_not_pin_hmmds_descriptors(
    shared_dir, make_user, make_group, puppet
):
    group = make_group()
    proc, endpoint = start_hmmd(shared_dir, 512, "--socket-group", group)
    user = make_user(groups=(group,))
    try:
        before = fd_count(proc.pid)
        out = await asyncio.to_thread(user.run, user.python(OFFERS, endpoint, "600"), 180)
        assert out.returncode == 0, out.stderr
        await asyncio.sleep(1.0)  # a sweep (each heartbeat) closes the offers of the dead
        after = fd_count(proc.pid)
        print(f"\nrow 8: 600 offers ({out.stdout.strip()} refused); hmmd fds {before} -> {after}")
        assert after < before + 32, f"offers pinned {after - before} descriptors"
        addr = await puppet.mmap(PAGE)
        async with connect(endpoint, name="witness") as s:
            await s.mirror(puppet.pid, addr, PAGE, Access.READ)  # REGISTER still works
        assert proc.returncode is None
    finally:
        stop_hmmd(proc)


# --- row 12: one daemon per endpoint --------------------------------------------------------------


def test_row12_a_second_hmmd_on_a_live_endpoint_exits_2_and_sighup_reloads(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('[[grant]]\nagents = ["uid:0"]\naccess = ["read"]\n')
    proc, endpoint = start_hmmd(str(tmp_path), 4096, "--policy", str(policy))
    path = endpoint[len("ipc://") :]
    try:
        inode = os.stat(path).st_ino
        second = subprocess.run(
            [*HMMD, "--endpoint", endpoint], capture_output=True, text=True, timeout=30
        )
        assert second.returncode == 2, second
        assert second.stderr.count("\n") == 1 and "live process" in second.stderr, second.stderr
        assert os.stat(path).st_ino == inode, "the live daemon's socket was replaced"
        assert asyncio.run(status(endpoint))["sessions"] == 0  # the first one still serves
        policy.write_text('[[grant]]\nagents = ["uid:0"]\naccess = ["read", "write"]\n')
        proc.kill(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.returncode is None, "SIGHUP killed hmmd"
        assert asyncio.run(status(endpoint))["sessions"] == 0
    finally:
        err = stop_hmmd(proc)
    assert proc.returncode == 0, err
    assert "SIGHUP: policy" in err and "read again" in err, err
    assert not os.path.exists(path), "hmmd left its socket behind"


async def test_row7_watched_processes_are_capped_below_the_descriptor_limit(shared_dir):
    # 320 descriptors: after hmmd's reserve, room for 8 watched processes (5 descriptors each).
    proc, endpoint = start_hmmd(shared_dir, 320)
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(9)]
    try:
        async with connect(endpoint, name="many") as s:
            for sleeper in sleepers[:8]:
                await s.mirror(sleeper.pid, 0x10000, PAGE, Access.READ)
            with pytest.raises(RemoteError) as info:
                await s.mirror(sleepers[8].pid, 0x10000, PAGE, Access.READ)
            assert info.value.code == ErrorCode.EBUSY and "descriptor limit" in info.value.message
        assert proc.returncode is None
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
        stop_hmmd(proc)
