"""The command lines as an operator meets them: help, configuration layers, exit codes,
the socket's permissions, shutdown, hmmctl, and the demo (the main job)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hmmirror.testing.hmmd import HmmdProcess, start_hmmd

PY = sys.executable


@pytest.fixture
def directory() -> Iterator[str]:
    """A fresh directory under /tmp (short ipc paths) for a daemon's socket, removed after."""
    path = tempfile.mkdtemp(prefix="hmmc-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def test_hmmd_help_names_commands_and_layers():
    out = run("hmmirror.daemon", "--help")
    assert out.returncode == 0
    for word in ("run", "check-config", "--print-config", "HMMIRROR_"):
        assert word in out.stdout
    sub = run("hmmirror.daemon", "run", "--help")
    assert sub.returncode == 0 and "--ack-deadline" in sub.stdout


def test_config_layers_file_then_environment_then_flags(tmp_path):
    cfg = tmp_path / "hmmd.toml"
    cfg.write_text('ack_deadline = "5s"\nheartbeat = "250ms"\npoll_max = "80ms"\n')
    out = run(
        "hmmirror.daemon", "--config", str(cfg), "--print-config", env={"HMMIRROR_HEARTBEAT": "2s"}
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" = ", 1) for line in out.stdout.splitlines())
    assert lines["ack_deadline"] == '"5s"'  # from the file
    assert lines["heartbeat"] == '"2s"'  # the environment beats the file
    assert lines["poll_max"] == '"80ms"'
    flagged = run(
        "hmmirror.daemon", "--config", str(cfg), "run", "--ack-deadline", "750ms", "--print-config",
        env={"HMMIRROR_HEARTBEAT": "2s"},
    )  # fmt: skip
    assert flagged.returncode == 0, flagged.stderr
    assert 'ack_deadline = "750ms"' in flagged.stdout  # flags beat everything


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("ack_dedline = '2s'\n", "unknown key 'ack_dedline'"),
        ("ack_deadline = 'soon'\n", "not a duration"),
        ("endpoint = 'udp://x'\n", "endpoint must start with"),
        ("poll_min = '1s'\npoll_max = '10ms'\n", "poll_min must not exceed poll_max"),
        ("heartbeat = '30m'\n", "heartbeat x lease_factor is 5400 s; agents accept at most"),
        ("ack_deadline = '2h'\n", "ack_deadline is 7200 s; agents accept at most 3600 s"),
        ("[hmmd\n", "hmmd.toml"),
    ],
)
def test_bad_configuration_is_refused_with_exit_2(tmp_path, text, complaint):
    cfg = tmp_path / "hmmd.toml"
    cfg.write_text(text)
    out = run("hmmirror.daemon", "--config", str(cfg), "check-config")
    assert out.returncode == 2
    assert complaint in out.stderr


def test_good_configuration_checks_out(tmp_path):
    cfg = tmp_path / "hmmd.toml"
    cfg.write_text("[hmmd]\nack_deadline = '3s'\nlog_level = 'warning'\n")
    out = run("hmmirror.daemon", "--config", str(cfg), "check-config")
    assert out.returncode == 0 and "OK" in out.stdout


def test_run_binds_a_0660_socket_and_stops_cleanly_on_sigterm(
    directory: str, tmp_path: Path
) -> None:
    endpoint = f"ipc://{directory}/hmmd.sock"
    hmmd = start_hmmd(endpoint, log_path=str(tmp_path / "hmmd.stderr"))
    _check_running_daemon(hmmd, directory, endpoint)


def _check_running_daemon(hmmd: HmmdProcess, directory: str, endpoint: str) -> None:
    try:
        assert hmmd.stdout_lines[0] == f"hmmd ready {endpoint}"
        mode = stat.S_IMODE(os.stat(f"{directory}/hmmd.sock").st_mode)
        assert mode == 0o660, oct(mode)
        status = run("hmmirror.tools.ctlapp", "--endpoint", endpoint, "status")
        assert status.returncode == 0, status.stderr
        assert "epoch" in status.stdout and "invalidations" in status.stdout
        hmmd.kill(signal.SIGTERM)
        assert hmmd.wait(timeout=10) == 0
    finally:
        hmmd.stop()


def test_hmmctl_status_without_a_daemon_fails_fast_and_says_where():
    t0 = time.monotonic()
    out = run(
        "hmmirror.tools.ctlapp",
        "--endpoint",
        "ipc:///tmp/hmm-nobody-here.sock",
        "--timeout",
        "1",
        "status",
    )
    assert out.returncode == 1
    assert "ipc:///tmp/hmm-nobody-here.sock" in out.stderr
    assert time.monotonic() - t0 < 10


def test_a_client_that_abandons_its_session_still_exits_promptly(
    directory: str, tmp_path: Path
) -> None:
    """Sockets, context and loop left open at exit must not hang the process (linger 0)."""
    endpoint = f"ipc://{directory}/hmmd.sock"
    daemon = start_hmmd(endpoint, log_path=str(tmp_path / "hmmd.stderr"))
    _abandon_a_session(daemon, endpoint)


def _abandon_a_session(daemon: HmmdProcess, endpoint: str) -> None:
    try:
        script = textwrap.dedent(
            f"""
            import asyncio, os, sys
            from hmmirror.client import Session
            async def main():
                s = Session({endpoint!r}, "abandoner", 5.0)
                await s.open()
                await s.sync_range(os.getpid(), 4096, 8192)
                sys.exit(0)  # no close(): the session, its socket and context are abandoned
            asyncio.run(main())
            """
        )
        t0 = time.monotonic()
        child = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=30)
        assert child.returncode == 0, child.stderr
        assert time.monotonic() - t0 < 10
    finally:
        daemon.stop(10)


def test_demo_runs_and_reports_zero_violations():
    out = run(
        "hmmirror.tools.ctlapp", "demo", "--duration", "3", "--seed", "7",
        "--check-duration", "3", timeout=90,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    report = out.stdout[out.stdout.index("hmmirror demo report") :]
    checked = report[report.index("hmmirror coherence check") :]
    report = report[: report.index("hmmirror coherence check")]
    check_rows = dict(
        re.split(r"\s{2,}", line, maxsplit=1)  # "key<padding>  value"
        for line in checked.splitlines()[2:]
        if "  " in line and not line.startswith(" ")
    )
    assert check_rows["violations"] == "0", checked
    assert check_rows["seed"] == "7"
    assert int(check_rows["READs judged (data oracle)"]) > 0, checked
    assert int(check_rows["translations checked"]) > 0, checked
    rows = {
        key.strip(): value.strip()
        for key, value in (line.rsplit("  ", 1) for line in report.splitlines()[2:] if "  " in line)
    }
    assert rows["coherence violations"] == "0"
    assert int(rows["invalidations (hmmd)"]) > 0
    assert int(rows["rounds (quiescent checks)"]) >= 1
    assert rows["seed"] == "7"


def test_the_shipped_sample_configuration_is_valid_and_matches_the_defaults():
    sample = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "hmmd.toml")
    checked = run("hmmirror.daemon", "--config", sample, "check-config")
    assert checked.returncode == 0, checked.stderr
    with_sample = run("hmmirror.daemon", "--config", sample, "--print-config")
    defaults = run("hmmirror.daemon", "--config", os.devnull, "--print-config")
    assert with_sample.returncode == 0 and defaults.returncode == 0
    assert with_sample.stdout == defaults.stdout, "the sample no longer shows the defaults"


def test_sockets_belong_to_the_socket_group(directory: str, tmp_path: Path) -> None:
    import grp

    group = "daemon" if "daemon" in {g.gr_name for g in grp.getgrall()} else "nogroup"
    gid = grp.getgrnam(group).gr_gid
    endpoint = f"ipc://{directory}/hmmd.sock"
    hmmd = start_hmmd(endpoint, ["--socket-group", group], log_path=str(tmp_path / "hmmd.stderr"))
    try:
        # One socket: the door, where agents and targets (their userfaultfds) knock; and the
        # claims the hmmds of this directory share (SPEC §1.7), theirs alone.
        assert sorted(os.listdir(directory)) == ["hmmd-owners", "hmmd.sock"]
        st = os.stat(f"{directory}/hmmd.sock")
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
        owners = os.lstat(f"{directory}/hmmd-owners")
        assert stat.S_ISDIR(owners.st_mode) and stat.S_IMODE(owners.st_mode) == 0o700
    finally:
        assert hmmd.stop(10) == (0, False)


def test_json_logs_are_one_object_per_line(directory: str, tmp_path: Path) -> None:
    import json

    endpoint = f"ipc://{directory}/hmmd.sock"
    hmmd = start_hmmd(endpoint, ["--log-format", "json"], log_path=str(tmp_path / "hmmd.stderr"))
    hmmd.stop(10)
    err = hmmd.log()
    records = [json.loads(line) for line in err.splitlines()]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert any("hmmd ready on" in r["msg"] and r["level"] == "info" for r in records)


@pytest.mark.parametrize("module, prog", [
    ("hmmirror.daemon", "hmmd"),
    ("hmmirror.tools.ctlapp", "hmmctl"),
    ("hmmirror.tools.agentapp", "hm-agent"),
])  # fmt: skip
def test_every_program_prints_its_version_and_the_protocol_in_one_line(module, prog):
    from hmmirror.proto.version import PROTOCOL_VERSION

    out = run(module, "--version")
    assert out.returncode == 0, out.stderr
    protocol = f"{PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}"
    assert re.fullmatch(rf"{re.escape(prog)} \d+\.\d+\.\d+\S*, protocol {protocol}\n", out.stdout)
    assert run(module, "version").stdout == out.stdout  # the subcommand says the same


def test_hm_agent_and_hmmd_refuse_a_bad_config_value_alike(tmp_path):
    """One configuration layer: the same one-line error, naming file and key, and exit 2."""
    bad = tmp_path / "bad.toml"
    bad.write_text("insecure = 'perhaps'\n")
    for module, prog in (("hmmirror.daemon", "hmmd"), ("hmmirror.tools.agentapp", "hm-agent")):
        out = run(module, "--config", str(bad), "check-config")
        assert out.returncode == 2, out.stderr
        assert out.stderr == (
            f"{prog}: configuration error: {bad}: insecure must be true or false, got 'perhaps'\n"
        )
        typo = tmp_path / "typo.toml"
        typo.write_text("insecur = true\n")
        out = run(module, "--config", str(typo), "check-config")
        assert (out.returncode, out.stderr) == (
            2, f"{prog}: configuration error: {typo}: unknown key 'insecur'\n"
        )  # fmt: skip
