"""Errors as an operator meets them: one line on stderr, ``PROG: ...``, the documented exit
status (2 for usage and configuration, 1 otherwise), never a traceback; ``check-config``
refuses all that ``run`` would; and the library's refusals carry their errno.

Every program is a real process (``python -m``); the library cases drive a real hmmd and a
real hm-agent.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hmmirror.client import DeviceError, RemoteError, RequestTimeout
from hmmirror.client.mlx5 import RemoteAccessError
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages.limits import MAX_MIRROR_PAGES
from hmmirror.testing.curve import NO_KEY_ENV, curve_hmmd
from hmmirror.testing.rdma import hm_agent

PY = sys.executable
HMMD, HMMCTL, HM_AGENT = "hmmirror.daemon", "hmmirror.tools.ctlapp", "hmmirror.tools.agentapp"
PROG = {HMMD: "hmmd", HMMCTL: "hmmctl", HM_AGENT: "hm-agent"}
PAGE = 4096
LONG_PATH = "/tmp/" + "x" * 110


def run(
    module: str,
    *args: str,
    env: dict[str, str] | None = None,
    python: str = PY,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-m", module, *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def one_line(out: subprocess.CompletedProcess[str], module: str, code: int, *says: str) -> str:
    """``out`` failed with ``code`` and said so in one line ``PROG: ...`` naming ``says``."""
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"{PROG[module]}: "), out.stderr
    for word in says:
        assert word in lines[0], out.stderr
    return lines[0]


def _short_keys(tmp_path: Path) -> str:
    """A certificate file of the right shape whose keys are not CURVE keys (mode 0600)."""
    cert = tmp_path / "short.key_secret"
    cert.write_text('curve\n    public-key = "short"\n    secret-key = "short"\n')
    cert.chmod(0o600)
    return str(cert)


# --- hmmd: check-config refuses all that run would -----------------------------------------


@pytest.mark.parametrize(
    "text, says",
    [
        ('metrics = "not-a-hostport"', "metrics"),
        ('metrics = "127.0.0.1:99999"', "port of 0 to 65535"),
        ('metrics = "nohost.invalid:9464"', "cannot resolve"),
        ('endpoint = "ipc://"', "names no socket path"),
        (f'endpoint = "ipc://{LONG_PATH}"', "longer than 107 bytes"),
        ('endpoint = "tcp://notahost:99999"\ninsecure = true', "port of 0 to 65535"),
        ('endpoint = "tcp://nohost.invalid:5555"\ninsecure = true', "cannot resolve"),
        (f'expose_socket = "{LONG_PATH}"', "longer than 107 bytes"),
        ('heartbeat = "0.0001ms"', "shorter than 1ms"),
        ('poll_min = "0s"', "positive"),
        ("nice = 25", "from -20 to 19"),
        ('nice = "fast"', "whole number"),
        ("SHORT_KEYS", "40-character Z85 key"),
    ],
)  # fmt: skip
def test_check_config_refuses_what_run_refuses_in_one_line(tmp_path, text, says):
    if text == "SHORT_KEYS":
        allow = tmp_path / "allow"
        allow.mkdir()
        text = (
            f'endpoint = "tcp://127.0.0.1:0"\ncurve_key = "{_short_keys(tmp_path)}"\n'
            f'curve_allow = "{allow}"'
        )
    cfg = tmp_path / "hmmd.toml"
    cfg.write_text(text + "\n")
    checked = run(HMMD, "--config", str(cfg), "check-config")
    line = one_line(checked, HMMD, 2, "configuration error", says)
    # run refuses it the same way, before it binds anything (on a private socket, unless
    # the endpoint is what is wrong)
    where = [] if "endpoint" in text else ["--endpoint", f"ipc://{tmp_path}/h.sock"]
    ran = run(HMMD, "--config", str(cfg), "run", *where, timeout=15)
    assert one_line(ran, HMMD, 2) == line


def test_print_config_writes_durations_as_they_are_written(tmp_path):
    cfg = tmp_path / "hmmd.toml"
    cfg.write_text('poll_min = "2ms"\nheartbeat = "1500ms"\nack_deadline = "2s"\n')
    out = run(HMMD, "--config", str(cfg), "--print-config")
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" = ", 1) for line in out.stdout.splitlines())
    assert (lines["poll_min"], lines["heartbeat"], lines["ack_deadline"]) == (
        '"2ms"', '"1.5s"', '"2s"',
    )  # fmt: skip
    again = tmp_path / "again.toml"
    again.write_text(out.stdout)  # what it prints reads back as the same settings
    assert run(HMMD, "--config", str(again), "--print-config").stdout == out.stdout


@pytest.mark.parametrize(
    "module, args, says",
    [
        (HMMD, ["run", "--log-level", "loud"], "hmmd: run: argument --log-level"),
        (HMMD, ["run", "--heartbeat", "-1"], "--heartbeat"),
        (HMMD, ["bogus"], "invalid choice"),
        (HMMD, ["run", "--nice", "-21"], "--nice must be from -20 to 19"),
        (HM_AGENT, ["--bogus"], "unrecognized arguments"),
        (HMMCTL, ["--endpoint", "garbage", "status"], "must start with ipc:// or tcp://"),
        (HMMCTL, ["--endpoint", "udp://10.0.0.1:5", "mms"], "udp://10.0.0.1:5"),
        (HMMCTL, ["--endpoint", "ipc://", "status"], "names no socket path"),
        (HMMCTL, ["--endpoint", "tcp://notahost:99999", "status"], "port of 0 to 65535"),
        (HMMCTL, ["stat", "mr", "--agent", "garbage"], "hmmctl: stat mr: argument --agent"),
        (HMMCTL, ["--timeout", "-1", "status"], "--timeout"),
        (HMMCTL, ["--timeout", "0", "status"], "positive"),
        (HMMCTL, ["top", "--count", "-1"], "--count"),
        (HMMCTL, ["top", "--interval", "0", "--count", "1"], "--interval"),
        (HMMCTL, ["check", "--duration", "-5"], "--duration"),
        (HMMCTL, ["check", "--ops", "0"], "--ops"),
        (HMMCTL, ["check", "--scenario", "nope"], "no scenario 'nope'"),
        (HMMCTL, ["demo", "--duration", "-1"], "--duration"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_and_exit_2(module, args, says):
    one_line(run(module, *args), module, 2, says)


def test_a_bad_endpoint_in_the_environment_is_a_usage_error_too():
    out = run(HMMCTL, "status", env={"HMMIRROR_ENDPOINT": "udp://x:1"})
    one_line(out, HMMCTL, 2, "udp://x:1")


# --- hm-agent --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, says",
    [
        ('daemon = "garbage"', "daemon must start with"),
        ('listen = "tcp://127.0.0.1:99999"\ninsecure = true', "port of 0 to 65535"),
        ('listen = "ipc://"', "names no socket path"),
        ('log_level = "loud"', "log_level"),
        ('server_key = "/nonexistent.key"', "go together"),
        ('server_key = "/nonexistent.key"\nclient_key = "/nonexistent.key_secret"',
         "cannot load CURVE certificate /nonexistent.key"),
    ],
)  # fmt: skip
def test_hm_agent_check_config_refuses_what_run_refuses(tmp_path, text, says):
    cfg = tmp_path / "agent.toml"
    listen = "" if "listen" in text else f'listen = "ipc://{tmp_path}/agent.sock"\n'
    cfg.write_text(listen + text + "\n")
    line = one_line(run(HM_AGENT, "--config", str(cfg), "check-config"), HM_AGENT, 2, says)
    assert one_line(run(HM_AGENT, "--config", str(cfg)), HM_AGENT, 2) == line


# --- keys ------------------------------------------------------------------------------------


def test_keys_generate_keeps_existing_keys_and_stays_in_its_directory(tmp_path):
    keys = tmp_path / "keys"
    assert run(HMMCTL, "keys", "generate", str(keys), "hmmd").returncode == 0
    before = (keys / "hmmd.key_secret").read_bytes(), (keys / "hmmd.key").read_bytes()
    again = run(HMMCTL, "keys", "generate", str(keys), "hmmd")
    one_line(again, HMMCTL, 1, "exists", "--force")
    assert ((keys / "hmmd.key_secret").read_bytes(), (keys / "hmmd.key").read_bytes()) == before
    forced = run(HMMCTL, "keys", "generate", str(keys), "hmmd", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (keys / "hmmd.key_secret").read_bytes() != before[0]
    assert oct((keys / "hmmd.key_secret").stat().st_mode & 0o777) == oct(0o600)
    for name in ("../outside", "a/b", ".hidden", "x y", ""):
        one_line(run(HMMCTL, "keys", "generate", str(keys), name), HMMCTL, 2, "key name")
    assert sorted(os.listdir(tmp_path)) == ["keys"], "nothing written outside DIR"
    assert sorted(os.listdir(keys)) == ["hmmd.key", "hmmd.key_secret"]


def test_a_client_secret_key_others_can_read_is_refused_as_hmmd_s_own_is(tmp_path):
    """hmmd refused a secret key file others could read; hmmctl and hm-agent took theirs."""
    keys = tmp_path / "keys"
    for name in ("hmmd", "me"):
        assert run(HMMCTL, "keys", "generate", str(keys), name).returncode == 0
    secret = keys / "me.key_secret"
    secret.chmod(0o644)
    client = ["--server-key", str(keys / "hmmd.key"), "--client-key", str(secret)]
    out = run(HMMCTL, "--endpoint", "tcp://127.0.0.1:1", *client, "status")
    one_line(out, HMMCTL, 2, "me.key_secret is readable by others (mode 644); chmod 600 it")


def test_a_client_without_curve_keys_is_told_what_to_set(tmp_path):
    with curve_hmmd(tmp_path) as rig:
        out = run(HMMCTL, "--endpoint", rig.endpoint, "--timeout", "1", "status", env=NO_KEY_ENV)
        one_line(out, HMMCTL, 1, "HMMIRROR_SERVER_KEY", "HMMIRROR_CLIENT_KEY")
        missing = {"HMMIRROR_SERVER_KEY": str(rig.keys / "nope.key"),
                   "HMMIRROR_CLIENT_KEY": rig.client_key}  # fmt: skip
        out = run(HMMCTL, "--endpoint", rig.endpoint, "status", env=missing)
        one_line(out, HMMCTL, 2, "nope.key")
        agent = run(
            HM_AGENT, "--daemon", rig.endpoint, "--listen", f"ipc://{tmp_path}/a.sock",
            env=NO_KEY_ENV,
        )  # fmt: skip
        one_line(agent, HM_AGENT, 1, "server_key")
        # The library itself says it too, for agents that are not hmmctl or hm-agent.
        import zmq
        from hmmirror.transport import Dialer, DoorError

        ctx = zmq.Context()
        dialer = Dialer(ctx, rig.endpoint, None)
        try:
            with pytest.raises(DoorError, match="requires CURVE ignores a client without keys"):
                dialer.dial_sync(1.0)
        finally:
            dialer.sock.close(linger=0)
            ctx.destroy(linger=0)
        good = {"HMMIRROR_SERVER_KEY": rig.server_key,
                "HMMIRROR_CLIENT_KEY": rig.client_key}  # fmt: skip
        out = run(HMMCTL, "--endpoint", rig.endpoint, "status", env=good)
        assert out.returncode == 0 and "epoch" in out.stdout, out.stderr


# --- tools installed without the daemon ------------------------------------------------------


@pytest.fixture
def python_without_daemon(tmp_path: Path) -> str:
    """An interpreter (a venv) that has proto, transport, client and tools, not the daemon."""
    import site
    import sysconfig

    root = Path(__file__).resolve().parents[2]
    venv = tmp_path / "venv"
    packages = venv / Path(sysconfig.get_path("purelib")).relative_to(sys.prefix)
    packages.mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "pyvenv.cfg").write_text(
        f"home = {os.path.dirname(os.path.realpath(sys.executable))}\n"
        "include-system-site-packages = false\n"
    )
    python = venv / "bin" / "python"
    python.symlink_to(os.path.realpath(sys.executable))
    # This venv's third-party packages (pyzmq, msgpack, ...), but not its .pth files,
    # which would bring the daemon back: a path listed in a .pth is not itself scanned.
    paths = [p for p in site.getsitepackages() if p.startswith(sys.prefix)]
    paths += [str(root / d / "src") for d in ("proto", "transport", "client", "tools")]
    (packages / "hmmirror-no-daemon.pth").write_text("\n".join(paths) + "\n")
    probe = subprocess.run(
        [str(python), "-c", "import hmmirror.daemon"], capture_output=True, timeout=30
    )
    assert probe.returncode != 0, "the daemon is importable: the venv is not what it claims"
    return str(python)


def test_tools_without_the_daemon_say_what_is_missing(python_without_daemon):
    for command in ("demo", "check"):
        out = run(HMMCTL, command, "--duration", "1", python=python_without_daemon)
        one_line(out, HMMCTL, 1, command, "hmmirror-daemon", "not installed")
    # the rest of hmmctl needs no daemon installed
    out = run(
        HMMCTL, "--endpoint", "ipc:///tmp/hmm-nobody-here.sock", "status",
        python=python_without_daemon,
    )  # fmt: skip
    one_line(out, HMMCTL, 1, "ipc:///tmp/hmm-nobody-here.sock")


def test_a_demo_whose_hmmd_cannot_start_says_why_in_one_line():
    out = run(HMMCTL, "demo", "--duration", "1", env={"HMMIRROR_POLICY": "/nonexistent.toml"})
    one_line(out, HMMCTL, 1, "cannot start hmmd", "/nonexistent.toml")


# --- the library: refusals carry their errno, once -------------------------------------------


async def test_registration_refusals_are_device_errors_with_their_errno(agent, puppet):
    addr = await puppet.mmap(PAGE)
    async with agent() as session:
        cases = [
            ((2**22 + 12345, addr, PAGE), errno.ESRCH, ErrorCode.ESRCH),  # no such process
            ((puppet.pid, addr + 1, PAGE), errno.EINVAL, ErrorCode.EINVAL),  # unaligned
            ((puppet.pid, 0, (MAX_MIRROR_PAGES + 1) * PAGE), errno.EINVAL, ErrorCode.TOO_LARGE),
        ]
        for args, number, code in cases:
            with pytest.raises(DeviceError) as info:
                await session.mirror(*args)
            assert info.value.errno == number, info.value
            assert isinstance(info.value, RemoteError) and info.value.code == code
            assert str(info.value).startswith(f"[Errno {number}] {os.strerror(number)}: ")
            assert str(info.value).count("[Errno") == 1


async def test_rdma_peer_errors_name_their_errno_once(hmmd, puppet):
    addr = await puppet.mmap(PAGE)
    async with (
        hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{PAGE}:ra") as rdma,
        rdma.peer() as peer,
    ):
        (rkey,) = rdma.rkeys
        with pytest.raises(RemoteAccessError) as info:
            await peer.read(rkey ^ 0x100, addr, 8)
        text = str(info.value)
        assert text.startswith("[Errno 13] Permission denied: ") and text.count("[Errno") == 1
        assert "Permission denied: Permission denied" not in text
        with pytest.raises(DeviceError) as bad:
            await peer.fetch_add(rkey, addr + 4, 1)  # not 8-byte aligned
        assert bad.value.errno == errno.EINVAL
        assert str(bad.value).count("[Errno") == 1, str(bad.value)


@pytest.mark.hmmd_args("--heartbeat", "2s")  # the stopped agent keeps its session meanwhile
async def test_a_read_only_request_that_times_out_does_not_say_it_may_have_taken_effect(
    hmmd, puppet
):
    addr = await puppet.mmap(PAGE)
    async with (
        hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{PAGE}:r") as rdma,
        rdma.peer(timeout=0.5) as peer,
    ):
        (rkey,) = rdma.rkeys
        await peer.stat_mr()  # connected
        rdma.proc.send_signal(signal.SIGSTOP)
        try:
            for ask in (peer.stat_mr(), peer.read(rkey, addr, 8)):
                with pytest.raises(RequestTimeout) as info:
                    await ask
                assert "may have taken effect" not in str(info.value)
                assert "nothing was changed" in str(info.value)
        finally:
            rdma.proc.send_signal(signal.SIGCONT)


@pytest.mark.hmmd_args("--heartbeat", "5s")  # the session outlives hmmd's pause
async def test_a_session_request_that_times_out_says_whether_it_could_have_changed_anything(
    hmmd, puppet, agent
):
    """A status that got no answer changed nothing; a sync_range may have taken effect."""
    addr = await puppet.mmap(PAGE)
    async with agent(timeout=0.5) as s:
        await s.status()  # connected
        hmmd.kill(signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeout) as read:
                await s.status()
            assert "it changed nothing" in str(read.value), str(read.value)
            with pytest.raises(RequestTimeout) as write:
                await s.sync_range(puppet.pid, addr, addr + PAGE)
            assert "it may have taken effect" in str(write.value), str(write.value)
        finally:
            hmmd.kill(signal.SIGCONT)
