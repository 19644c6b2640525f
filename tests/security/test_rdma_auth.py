"""Issue 11, rows 3 and 14: hm-agent's RDMA listener lets in only who belongs, and says so.

Row 3 (at 6c59ac2): the listener had no authentication; ``stat_mr`` listed every
rkey, pid and address to anyone; an rkey was the MR number plus 8 random bits;
another user read and wrote a root target. Row 14: a ``--listen`` that could not
be bound hung forever, printing nothing.

Every agent here is a real ``hm-agent`` on a real hmmd, over tcp loopback (CURVE
unless the test says otherwise) or ipc. Attackers are raw ZeroMQ peers run as
separate processes (``ATTACK``), as root or as a real other user (``make_user``);
the targets are root's puppets.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest
import zmq.auth
from hmmirror.client.curve import CurveKeys, generate
from hmmirror.client.errors import DaemonUnavailable, RemoteError
from hmmirror.client.mlx5 import RdmaPeer, RemoteAccessError
from hmmirror.proto.errors import ErrorCode
from hmmirror.testing.rdma import HM_AGENT, agent_keys, hm_agent, read_ready

PAGE = 4096
HMMCTL = [sys.executable, "-m", "hmmirror.tools.ctlapp"]
SECRET = (b"root's secret page " * 500)[: 2 * 4096]
#: How long an attacker keeps trying before it reports what it got.
ATTACK_SECONDS = 3.0

#: A raw DEALER that asks for ``stat_mr``, READs and WRITEs ``rkey`` at ``addr`` every
#: 0.5 s, with no CURVE key or (``server_key`` given) with a key pair of its own that no
#: allow-list holds; it prints what came back and what its socket monitor saw, as JSON.
ATTACK = r"""
import json, sys, time
import zmq
from zmq.utils.monitor import recv_monitor_message
from hmmirror.proto import messages as M
from hmmirror.proto.codec import decode, encode

endpoint, rkey, addr, server_key, seconds = sys.argv[1:6]
rkey, addr, seconds = int(rkey), int(addr), float(seconds)
ctx = zmq.Context()
curve, failed = None, False
if server_key:
    public, secret = zmq.curve_keypair()
try:  # knock as any client does, with a key pair of its own (or none)
    from hmmirror.transport import CurveKeys, Dialer, DoorError
except ImportError:  # an hmmirror from before the transport: a plain connect
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if server_key:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
            server_key.encode(), public, secret)
    monitor = sock.get_monitor_socket()
    sock.connect(endpoint)
else:
    if server_key:
        curve = CurveKeys(server_key.encode(), public, secret)
    dialer = Dialer(ctx, endpoint, curve)
    sock = dialer.sock
    try:
        dialer.dial_sync(seconds / 2)
    except DoorError:
        failed = True  # refused, or never connected back: the sends below find no peer
        sock = ctx.socket(zmq.DEALER)  # a failed dial closes its socket: one with no peer
        sock.linger = 0
    monitor = sock.get_monitor_socket()
asks = [(M.StatMr(), []), (M.RdmaRead(rkey=rkey, addr=addr, length=16), []),
        (M.RdmaWrite(rkey=rkey, addr=addr, length=6), [b"PWNED!"])]
replies, events, n, resend = [], set(), 0, 0.0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline and len(replies) < len(asks):
    if time.monotonic() >= resend:
        for msg, bulk in asks:
            n += 1
            try:
                sock.send_multipart(encode(msg, n, 0, bulk), zmq.NOBLOCK)
            except zmq.Again:
                pass
        resend = time.monotonic() + 0.5
    if sock.poll(50):
        env = decode(sock.recv_multipart())
        got = {"type": env.type}
        if env.type == "error":
            got["code"] = env.msg.code
        elif env.type == "stat_mr_reply":
            got["rows"] = list(env.msg.rows)
        elif env.type == "rdma_read_reply":
            got["data"] = bytes(env.bulk[0]).decode(errors="replace")
        replies.append(got)
    while monitor.poll(0):
        events.add(recv_monitor_message(monitor)["event"])
print(json.dumps({
    "replies": replies,
    "handshake_succeeded": bool(events & {zmq.EVENT_HANDSHAKE_SUCCEEDED}),
    "handshake_failed": failed or bool(events & {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_AUTH}),
}))
sock.disable_monitor()
monitor.close(0)
sock.close(0)
ctx.term()
"""


async def attack(
    endpoint: str, rkey: int, addr: int, *, server_key: str = "", user: Any = None
) -> dict[str, Any]:
    """Run ``ATTACK`` (as ``user``, or as root); what it got back."""
    cmd = [sys.executable, "-c", ATTACK, endpoint, str(rkey), str(addr), server_key,
           str(ATTACK_SECONDS)]  # fmt: skip
    if user is not None:
        out = await asyncio.to_thread(user.run, cmd)
    else:
        out = await asyncio.to_thread(
            subprocess.run, cmd, capture_output=True, text=True, timeout=30
        )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def by_type(result: dict[str, Any]) -> list[str]:
    """An attack's replies in a fixed order (a refusal is answered before a READ that runs)."""
    return sorted(json.dumps(r, sort_keys=True) for r in result["replies"])


def z85_public(path: str) -> str:
    """The Z85 public key in a certificate file."""
    return zmq.auth.load_certificate(path)[0].decode()


async def access_error(op: Any) -> str:
    """The REMOTE_ACCESS message ``op`` fails with (it must fail so)."""
    with pytest.raises(RemoteAccessError) as info:
        await op
    return str(info.value)


# --- row 3: who may connect ------------------------------------------------------------------


async def test_an_unauthenticated_tcp_requester_gets_no_handshake_no_data_no_stat_mr(hmmd, puppet):
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, SECRET[:PAGE])
    async with hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{PAGE}:rw", grants=[]) as agent:
        # The attacker even knows the live rkey (as if it had leaked).
        plain = await attack(agent.endpoint, agent.rkeys[0], addr)
        assert plain["replies"] == [], f"a requester with no key was answered: {plain}"
        assert not plain["handshake_succeeded"] and plain["handshake_failed"], plain
        stranger = await attack(
            agent.endpoint, agent.rkeys[0], addr, server_key=z85_public(agent.public_key)
        )
        assert stranger["replies"] == [], f"a key outside the allow-list was answered: {stranger}"
        assert not stranger["handshake_succeeded"] and stranger["handshake_failed"], stranger
        assert await puppet.read(addr, PAGE) == SECRET[:PAGE]
        # The agent was there all along: the allowed key is answered (and holds no MR).
        async with agent.peer() as peer:
            assert (await peer.stat_mr())[1] == []
        assert b"refused a handshake" in agent.errors and b"is not in" in agent.errors


async def test_another_user_without_a_key_reads_and_writes_nothing_of_a_root_target(
    hmmd, puppet, make_user
):
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, SECRET[:PAGE])
    nobody = make_user()
    async with hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{PAGE}:rwa") as agent:
        for server_key in ("", z85_public(agent.public_key)):
            got = await attack(
                agent.endpoint, agent.rkeys[0], addr, server_key=server_key, user=nobody
            )
            assert got["replies"] == [], f"{nobody.name} was answered: {got}"
            assert not got["handshake_succeeded"], got
        assert await puppet.read(addr, PAGE) == SECRET[:PAGE], "the root target was written"
        async with agent.peer() as peer:  # the granted requester is served meanwhile
            assert bytes(await peer.read(agent.rkeys[0], addr, 16)) == SECRET[:16]


async def test_the_allow_list_is_read_again_when_it_changes(hmmd, puppet):
    addr = await puppet.mmap(PAGE)
    async with hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{PAGE}:r") as agent:
        public, late = agent.requester("late", allowed=False)
        async with agent.peer(late, timeout=2.0) as peer:
            with pytest.raises(DaemonUnavailable, match="not in its allow-list"):
                await peer.stat_mr()
        shutil.copy(public, agent.allow)
        async with agent.peer(late) as peer:
            assert (await peer.stat_mr())[1] == []  # admitted now; granted nothing
        os.unlink(os.path.join(agent.allow, "requester.key"))
        async with agent.peer(timeout=2.0) as peer:
            with pytest.raises(DaemonUnavailable, match="not in its allow-list"):
                await peer.stat_mr()


# --- row 3: what an admitted requester may do ------------------------------------------------


async def test_an_allowed_key_without_a_grant_gets_remote_access_and_sees_no_mr(hmmd, puppet):
    addr = await puppet.mmap(2 * PAGE)
    await puppet.write(addr, SECRET[: 2 * PAGE])
    specs = (f"{puppet.pid}:{addr:#x}:{PAGE}:rwa", f"{puppet.pid}:all:r")
    async with hm_agent(hmmd, *specs, grants=[]) as agent, agent.peer() as peer:
        assert await peer.stat_mr() == ("mlx5_t", [])
        made_up = agent.rkeys[0] ^ (1 << 20)
        unknown = await access_error(peer.read(made_up, addr, 8))
        for rkey in agent.rkeys:
            for op in (
                peer.read(rkey, addr, 8),
                peer.write(rkey, addr, b"PWNED!"),
                peer.fetch_add(rkey, addr, 1),
            ):
                # Word for word what an unknown key gets: nothing tells it the key is live.
                assert await access_error(op) == unknown.replace(f"{made_up:#x}", f"{rkey:#x}")
        assert await puppet.read(addr, 2 * PAGE) == SECRET[: 2 * PAGE]
        out = await asyncio.to_thread(
            subprocess.run,
            [*HMMCTL, "stat", "mr", "--agent", agent.endpoint, *agent.hmmctl_keys()],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 0 and out.stdout == "", out


async def test_a_granted_key_uses_only_its_mrs_with_only_its_rights(hmmd, puppet, tmp_path):
    addr = await puppet.mmap(2 * PAGE)
    await puppet.write(addr, SECRET[: 2 * PAGE])
    a, b = addr, addr + PAGE
    public, secret = generate(str(tmp_path), "second")
    specs = (f"a={puppet.pid}:{a:#x}:{PAGE}:rwa", f"b={puppet.pid}:{b:#x}:{PAGE}:rwa")
    grants = ["REQUESTER:a:r", f"curve:{z85_public(public)}:b:rw"]
    async with hm_agent(hmmd, *specs, grants=grants) as agent:
        key_a, key_b = agent.rkeys
        shutil.copy(public, agent.allow)
        second = CurveKeys.load(agent.public_key, secret)
        async with agent.peer() as first:
            assert bytes(await first.read(key_a, a, 8)) == SECRET[:8]
            assert "REMOTE_WRITE was not granted" in await access_error(first.write(key_a, a, b"x"))
            assert "no MR with key" in await access_error(first.read(key_b, b, 8))
            _, rows = await first.stat_mr()
            assert [(r["mrn"], r["rkey"]) for r in rows] == [(1, key_a)]
        async with agent.peer(second) as peer:
            await peer.write(key_b, b, b"granted")
            assert await puppet.read(b, 7) == b"granted"
            assert bytes(await peer.read(key_b, b, 7)) == b"granted"
            assert "REMOTE_ATOMIC was not granted" in await access_error(
                peer.fetch_add(key_b, b, 1)
            )
            assert "no MR with key" in await access_error(peer.read(key_a, a, 8))
            _, rows = await peer.stat_mr()
            assert [(r["mrn"], r["rkey"]) for r in rows] == [(2, key_b)]
        assert await puppet.read(a, PAGE) == SECRET[:PAGE]


async def test_over_ipc_a_user_gets_only_what_its_uid_was_granted(hmmd, puppet, make_user):
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, SECRET[:PAGE])
    granted, other = make_user(), make_user()
    directory = tempfile.mkdtemp(prefix="hmai-", dir="/tmp")
    os.chmod(directory, 0o755)
    try:
        async with hm_agent(
            hmmd, f"{puppet.pid}:{addr:#x}:{PAGE}:rw", listen=f"ipc://{directory}/rdma.sock",
            grants=[f"uid:{granted.uid}:mr1:r"],
        ) as agent:  # fmt: skip
            denied = {"type": "error", "code": ErrorCode.REMOTE_ACCESS}
            got = await attack(agent.endpoint, agent.rkeys[0], addr, user=other)
            assert by_type(got) == by_type(
                {"replies": [{"type": "stat_mr_reply", "rows": []}, denied, denied]}
            ), got
            got = await attack(agent.endpoint, agent.rkeys[0], addr, user=granted)
            write, read, stat = by_type(got)  # error < rdma_read_reply < stat_mr_reply
            assert json.loads(stat)["rows"][:3] == [1, agent.rkeys[0], puppet.pid], got
            assert json.loads(read) == {"type": "rdma_read_reply", "data": SECRET[:16].decode()}
            assert json.loads(write) == denied, got
            assert await puppet.read(addr, PAGE) == SECRET[:PAGE]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- row 3: rkeys are secrets ----------------------------------------------------------------


async def test_512_guesses_of_rkeys_find_no_live_key(hmmd, puppet):
    """On a plain-TCP listener granting ``any``, the rkey is all that stands between a
    stranger and the MR: it must not be found by guessing, nor asked for."""
    addr = await puppet.mmap(2 * PAGE)
    await puppet.write(addr, SECRET[: 2 * PAGE])
    specs = (f"{puppet.pid}:{addr:#x}:{PAGE}:rw", f"{puppet.pid}:{addr + PAGE:#x}:{PAGE}:rw")
    async with hm_agent(hmmd, *specs, insecure=True) as agent, agent.peer() as peer:
        # The attacker knows the layout (MR number, then random bits) but not the keys.
        bits = agent.rkeys[0].bit_length() - 1
        guesses = [
            (mrn << bits) | (v if bits == 8 else secrets.randbits(bits))
            for mrn in (1, 2)
            for v in range(256)
        ]

        async def hit(rkey: int, where: int) -> bool:
            try:
                await peer.read(rkey, where, 8)
            except RemoteAccessError:
                return False
            return True

        found = [
            g for g, ok in zip(
                guesses,
                await asyncio.gather(*(hit(g, addr + (g >> bits) * PAGE - PAGE) for g in guesses)),
                strict=True,
            ) if ok
        ]  # fmt: skip
        assert found == [], f"512 guesses found live rkeys {[hex(f) for f in found]}"
        assert [k >> bits for k in agent.rkeys] == [1, 2], [hex(k) for k in agent.rkeys]
        assert bits >= 32, f"rkeys carry {bits} random bits"
        with pytest.raises(RemoteError) as info:
            await peer.stat_mr()  # an unauthenticated requester is told no key
        assert info.value.code == ErrorCode.PERMISSION_DENIED
        # What "any" was granted works for whoever holds the key.
        assert bytes(await peer.read(agent.rkeys[1], addr + PAGE, 8)) == SECRET[PAGE : PAGE + 8]
        assert b"plain TCP (insecure = true)" in agent.errors, "insecure is logged as a warning"


# --- row 14: a listener that cannot be bound, and READY ---------------------------------------


def run_agent(
    hmmd, listen: str, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], float]:
    """``hm-agent --listen LISTEN`` to its end (30 s at most); the result and its duration."""
    t0 = time.monotonic()
    out = subprocess.run(
        [*HM_AGENT, "--daemon", hmmd.endpoint, "--listen", listen],
        capture_output=True, text=True, timeout=30, env=dict(os.environ, **env),
    )  # fmt: skip
    return out, time.monotonic() - t0


def test_listen_on_a_port_in_use_exits_2_at_once_with_one_line(hmmd):
    keys, env = agent_keys()
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        endpoint = f"tcp://127.0.0.1:{busy.getsockname()[1]}"
        try:
            out, took = run_agent(hmmd, endpoint, env)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"hm-agent on a port in use still runs after 30 s: {exc}"
            ) from None
        assert out.returncode == 2, out
        assert took < 5.0, f"{took:.1f} s"
        assert len(out.stderr.splitlines()) == 1 and endpoint in out.stderr, out.stderr
        assert "in use" in out.stderr and "Traceback" not in out.stderr
    finally:
        busy.close()
        shutil.rmtree(keys, ignore_errors=True)


def test_listen_on_a_bad_scheme_or_a_live_socket_exits_2_at_once_with_one_line(hmmd):
    keys, env = agent_keys()
    try:
        for listen, says, keys_env in (
            ("udp://127.0.0.1:18515", "only tcp:// and ipc://", env),
            (hmmd.endpoint, "served by a live process", {}),  # never take over a live socket
        ):
            try:
                out, took = run_agent(hmmd, listen, keys_env)
            except subprocess.TimeoutExpired as exc:
                raise AssertionError(
                    f"hm-agent --listen {listen} still runs after 30 s: {exc}"
                ) from None
            assert out.returncode == 2 and took < 5.0, (listen, out, took)
            assert out.stderr.count("\n") == 1 and says in out.stderr, out.stderr
        assert os.path.exists(hmmd.endpoint[len("ipc://") :]), "hmmd's socket was unlinked"
    finally:
        shutil.rmtree(keys, ignore_errors=True)


async def test_ready_reaches_systemd_only_once_the_agent_serves(hmmd, puppet, tmp_path):
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, SECRET[:PAGE])
    keys, env = agent_keys()
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(tmp_path / "notify.sock"))
    sink.setblocking(False)
    loop = asyncio.get_running_loop()
    proc = await asyncio.create_subprocess_exec(
        *HM_AGENT, "--daemon", hmmd.endpoint, "--listen", "tcp://127.0.0.1:0",
        "--mr", f"{puppet.pid}:{addr:#x}:{PAGE}:r", "--grant", f"{keys}/requester.key:*:r",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, **env, NOTIFY_SOCKET=str(tmp_path / "notify.sock")),
    )  # fmt: skip
    try:
        try:
            async with asyncio.timeout(15):
                first = (await loop.sock_recv(sink, 4096)).decode()
        except TimeoutError:
            raise AssertionError("no sd_notify message from hm-agent in 15 s") from None
        assert first.startswith("READY=1\n") and "STATUS=serving 1 MR(s) on tcp://" in first
        # By READY it has said where it serves, and it answers there at once.
        lines = await read_ready(proc, bytearray())
        assert lines[0].startswith("mr name=mr1 mrn=1 ")
        curve = CurveKeys.load(f"{keys}/agent.key", f"{keys}/requester.key_secret")
        async with RdmaPeer.connect(lines[-1].split()[-1], curve=curve, timeout=2.0) as peer:
            assert (await peer.stat_mr())[1][0]["pid"] == puppet.pid
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert (await loop.sock_recv(sink, 4096)).decode() == "STOPPING=1"
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        sink.close()
        shutil.rmtree(keys, ignore_errors=True)


# --- grants are read again on SIGHUP --------------------------------------------------------


async def test_sighup_rereads_the_grants_of_the_config_file(hmmd, puppet, tmp_path):
    addr = await puppet.mmap(PAGE)
    config = tmp_path / "agent.toml"

    def grant(rights: str, requester: str) -> None:
        config.write_text(
            f'[[grant]]\nrequesters = ["{requester}"]\nmrs = ["mr1"]\nrights = "{rights}"\n'
        )

    grant("r", "any")
    spec = f"{puppet.pid}:{addr:#x}:{PAGE}:rw"
    async with hm_agent(hmmd, spec, grants=[], extra=["--config", str(config)]) as agent:
        rkey = agent.rkeys[0]
        async with agent.peer() as peer:
            await peer.read(rkey, addr, 8)
            assert "not granted" in await access_error(peer.write(rkey, addr, b"w"))
            grant("rw", os.path.join(agent.keys, "requester.key"))
            agent.proc.send_signal(signal.SIGHUP)
            for _ in range(100):  # the signal is handled on the agent's loop, soon
                try:
                    await peer.write(rkey, addr, b"w")
                    break
                except RemoteAccessError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"SIGHUP did not grant the write: {agent.errors.decode()}")
            config.write_text("[[grant]\nbroken")
            agent.proc.send_signal(signal.SIGHUP)
            for _ in range(100):
                if b"grants unchanged" in agent.errors:
                    break
                await asyncio.sleep(0.05)
            assert b"grants unchanged" in agent.errors, agent.errors.decode()
            await peer.write(rkey, addr, b"still")
            assert await puppet.read(addr, 5) == b"still"
