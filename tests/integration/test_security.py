"""Transport security: tcp:// needs CURVE and a ZAP allow-list, unless insecure = true.

Real hmmd processes on tcp loopback, real ZeroMQ CURVE handshakes, keys made by
``hmmctl keys generate``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from hmmirror.client import DaemonUnavailable, connect
from hmmirror.client.curve import CurveKeys
from hmmirror.testing.hmmd import HmmdProcess, HmmdStartError, hmmd_argv, start_hmmd

HMMD = hmmd_argv("tcp://127.0.0.1:0")
HMMCTL = [sys.executable, "-m", "hmmirror.tools.ctlapp"]


def keys(directory, name: str) -> tuple[str, str]:
    out = subprocess.run(
        [*HMMCTL, "keys", "generate", str(directory), name],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    public = out.stdout.split("public ")[1].split()[0]
    secret = out.stdout.split("secret ")[1].split()[0]
    assert oct(os.stat(secret).st_mode & 0o777) == "0o600"
    return public, secret


def _loopback(host: str) -> str:
    """``host`` as an endpoint's host; skipped (with why) if this host has no such address."""
    if host == "::1":
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
                probe.bind(("::1", 0))
        except OSError as exc:
            pytest.skip(f"no IPv6 loopback address here: {exc}")
        return "[::1]"
    return host


LOOPBACKS = pytest.mark.parametrize("host", ["127.0.0.1", "::1"])


def start(tmp_path, *args: str, host: str = "127.0.0.1") -> tuple[HmmdProcess, str]:
    # The uffd intake of a tcp:// hmmd would live in /run/hmmirror: keep it in the test's dir.
    env = dict(os.environ, HMMIRROR_EXPOSE_SOCKET=str(tmp_path / "uffd.sock"))
    try:
        proc = start_hmmd(
            f"tcp://{_loopback(host)}:0", args, log_path=str(tmp_path / "hmmd.stderr"), env=env
        )
    except HmmdStartError as e:
        raise AssertionError(str(e)) from None
    return proc, proc.endpoint


def stop(proc: HmmdProcess) -> str:
    rc, _ = proc.stop(10)
    err = proc.log()
    assert rc == 0, err
    return err


def test_plain_tcp_needs_insecure_true():
    out = subprocess.run(HMMD, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "insecure = true" in out.stderr and "curve_key" in out.stderr


@LOOPBACKS
async def test_insecure_tcp_works_and_says_so(tmp_path, host):
    """Over IPv4 and IPv6 alike (over IPv6 hmmd never connected back: its sockets lacked
    ZMQ_IPV6, and libzmq refuses an IPv6 address without it)."""
    proc, endpoint = start(tmp_path, "--insecure", host=host)
    try:
        async with connect(endpoint, name="plain") as s:
            assert (await s.status())["sessions"] == 1
    finally:
        err = stop(proc)
    assert "plain TCP (insecure = true)" in err
    # The launcher's summary of the log finds that warning line (it matched "WARNING" at
    # the start of a line, which hmmd's timestamped lines never have, so it found nothing).
    assert "plain TCP (insecure = true)" in proc.problems(), proc.problems()


@LOOPBACKS
async def test_curve_admits_only_allowed_keys(tmp_path, host):
    _, server_secret = keys(tmp_path / "server", "hmmd")
    server_public = str(tmp_path / "server" / "hmmd.key")
    allowed_public, allowed_secret = keys(tmp_path / "agents", "good")
    _, rogue_secret = keys(tmp_path / "rogue", "bad")
    allow = tmp_path / "allow"
    allow.mkdir()
    os.link(allowed_public, allow / "good.key")
    proc, endpoint = start(
        tmp_path, "--curve-key", server_secret, "--curve-allow", str(allow), host=host
    )
    try:
        async with connect(
            endpoint, name="good", curve=CurveKeys.load(server_public, allowed_secret)
        ) as s:
            assert (await s.status())["sessions"] == 1
        # An unknown key, and no key at all, fail the handshake: hmmd never answers.
        for curve in (CurveKeys.load(server_public, rogue_secret), None):
            with pytest.raises(DaemonUnavailable):
                async with connect(endpoint, name="rogue", timeout=1.0, curve=curve):
                    pytest.fail("connected without an allowed key")
    finally:
        stop(proc)


def test_a_secret_key_readable_by_others_is_refused(tmp_path):
    _, secret = keys(tmp_path, "hmmd")
    os.chmod(secret, 0o644)
    out = subprocess.run(
        [*HMMD, "--curve-key", secret, "--curve-allow", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    assert "readable by others" in out.stderr


async def test_a_known_key_gets_what_its_grant_says_and_nothing_more(tmp_path):
    """A tcp agent gets nothing from the kernel's rule: only its grant, which here covers
    root's processes (privileged: they hold capabilities) for reading. An allowed key with
    no grant is refused everything."""
    import zmq.auth
    from hmmirror.client import Access, RemoteError
    from hmmirror.proto import ErrorCode

    _, server_secret = keys(tmp_path / "server", "hmmd")
    server_public = str(tmp_path / "server" / "hmmd.key")
    agent_public, agent_secret = keys(tmp_path / "agents", "agent")
    idle_public, idle_secret = keys(tmp_path / "idle", "idle")
    allow = tmp_path / "allow"
    allow.mkdir()
    os.link(agent_public, allow / "agent.key")
    os.link(idle_public, allow / "idle.key")
    z85 = zmq.auth.load_certificate(agent_public)[0].decode()
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[[grant]]\nagents = ["curve:{z85}"]\nuids = [0]\nprivileged = true\naccess = ["read"]\n'
    )
    mine = subprocess.Popen(["sleep", "60"])
    theirs = subprocess.Popen(["sleep", "60"], user=65534, group=65534)
    proc, endpoint = start(tmp_path, "--curve-key", server_secret, "--curve-allow", str(allow),
                           "--policy", str(policy))  # fmt: skip
    try:
        curve = CurveKeys.load(server_public, agent_secret)
        async with connect(endpoint, name="agent", curve=curve) as s:
            await s.mirror(mine.pid, 0x10000, 4096, Access.READ)  # uid 0: granted
            for pid, access in ((theirs.pid, Access.READ), (mine.pid, Access.READ | Access.WRITE)):
                with pytest.raises(RemoteError) as info:
                    await s.mirror(pid, 0x10000, 4096, access)
                assert info.value.code == ErrorCode.PERMISSION_DENIED
            assert f"curve:{z85}" in info.value.message and "uids 0" in info.value.message
            assert "pid" not in await s.status()  # no inspect grant: counters only
        idle = CurveKeys.load(server_public, idle_secret)
        async with connect(endpoint, name="idle", curve=idle) as s:
            with pytest.raises(RemoteError) as info:
                await s.mirror(mine.pid, 0x10000, 4096, Access.READ)
            assert "a tcp:// agent gets only what a grant gives it" in info.value.message
    finally:
        err = stop(proc)
        for p in (mine, theirs):
            p.kill()
            p.wait()
    assert "refused register" in err
