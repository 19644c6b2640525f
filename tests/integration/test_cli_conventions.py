"""Conventions users already know, on the real programs: ``-j/--json`` with stable keys,
global options before or after the command, CURVE keys as flags, shell completion,
``rdma``-shaped ``hmmctl stat mr``, and hm-agent's ``--log-format``.

Every program is a real process (``python -m``) against a real hmmd (and hm-agent).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hmmirror.proto.messages import Access
from hmmirror.testing.curve import NO_KEY_ENV, curve_hmmd
from hmmirror.testing.rdma import hm_agent

PY = sys.executable
HMMCTL, HM_AGENT = "hmmirror.tools.ctlapp", "hmmirror.tools.agentapp"
PAGE = 4096


def run(module: str, *args: str, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        [PY, "-m", module, *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


async def arun(module: str, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    """``run`` off the event loop (the hmmd fixture's sessions keep running meanwhile)."""
    return await asyncio.to_thread(run, module, *args, **kw)  # type: ignore[arg-type]


def objects(out: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    """stdout as one JSON object per line (the command must have succeeded)."""
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    lines = out.stdout.splitlines()
    parsed = [json.loads(line) for line in lines]
    assert all(isinstance(p, dict) for p in parsed), lines
    return parsed


# --- global options, before or after the command ---------------------------------------------


def test_global_options_go_before_or_after_the_command(hmmd):
    before = run(HMMCTL, "--endpoint", hmmd.endpoint, "--timeout", "2s", "-j", "status")
    after = run(HMMCTL, "status", "--endpoint", hmmd.endpoint, "--timeout", "2s", "--json")
    mixed = run(HMMCTL, "-j", "status", "--endpoint", hmmd.endpoint)
    [b], [a], [m] = objects(before), objects(after), objects(mixed)
    assert b.keys() == a.keys() == m.keys()
    assert b["epoch"] == a["epoch"] == m["epoch"]
    # One given after the command beats the one before it; a bad one after is refused.
    override = run(HMMCTL, "--endpoint", "ipc:///tmp/hmm-nobody.sock", "mms",
                   "--endpoint", hmmd.endpoint)  # fmt: skip
    assert override.returncode == 0, override.stderr
    bad = run(HMMCTL, "status", "--timeout", "-1")
    assert bad.returncode == 2 and bad.stderr.startswith("hmmctl: status: argument --timeout")
    # The environment's endpoint is still the default, wherever the flags go.
    env = run(HMMCTL, "status", "-j", env={"HMMIRROR_ENDPOINT": hmmd.endpoint})
    assert objects(env)[0]["epoch"] == b["epoch"]


def test_every_command_takes_the_global_options_after_it(tmp_path):
    for command in (["status"], ["mms"], ["mirrors"], ["top"], ["stat", "mr"], ["check"],
                    ["demo"], ["keys", "generate", "D", "N"], ["version"]):  # fmt: skip
        out = run(HMMCTL, *command, "--endpoint", "tcp://127.0.0.1:1", "-j", "--help")
        assert out.returncode == 0, (command, out.stderr)
        assert "Global options" in out.stdout


# --- -j/--json --------------------------------------------------------------------------------


async def test_mms_and_mirrors_print_one_object_per_row(hmmd, puppet, agent):
    addr = await puppet.mmap(4 * PAGE)
    async with agent(name="json-agent") as session:
        mirror = await session.mirror(puppet.pid, addr, 4 * PAGE, Access.READ | Access.WRITE)
        await mirror.read(addr, 2)
        [mm] = objects(await arun(HMMCTL, "mms", "-j", "--endpoint", hmmd.endpoint))
        assert set(mm) == {"pid", "start_time", "seq", "active", "mirrors", "watched"}
        assert mm["pid"] == puppet.pid and mm["mirrors"] == 1
        assert mm["watched"] in ("proc", "proc+uffd", "proc+uffd+strict")
        [row] = objects(await arun(HMMCTL, "--endpoint", hmmd.endpoint, "--json", "mirrors"))
        assert set(row) == {
            "mirror", "agent", "session", "pid", "lo", "hi", "held_pages", "access", "writes",
        }  # fmt: skip
        assert (row["agent"], row["pid"], row["lo"], row["hi"]) == (
            "json-agent", puppet.pid, addr, addr + 4 * PAGE,
        )  # fmt: skip
        assert (row["access"], row["writes"]) == ("rw", "-")
        text = await arun(HMMCTL, "mirrors", "--endpoint", hmmd.endpoint)
        assert f"{addr:#x}-{addr + 4 * PAGE:#x}" in text.stdout and "json-agent" in text.stdout


def test_top_prints_one_object_per_interval(hmmd):
    out = run(HMMCTL, "top", "-j", "--count", "2", "--interval", "100ms",
              "--endpoint", hmmd.endpoint)  # fmt: skip
    rows = objects(out)
    assert len(rows) == 2
    keys = {"ts", "sessions", "mms", "mirrors", "invalidations_per_s", "faults_per_s",
            "dma_per_s", "ack_p50_us", "ack_p99_us", "evictions", "stale"}  # fmt: skip
    assert all(set(r) == keys for r in rows), rows
    assert rows[1]["ts"] >= rows[0]["ts"]  # type: ignore[operator]
    text = run(HMMCTL, "--endpoint", hmmd.endpoint, "top", "--count", "1", "--interval", "50ms")
    assert text.returncode == 0 and text.stdout.splitlines()[0].startswith("TIME")


def test_each_command_help_names_its_json_keys():
    for command, key in (("status", "uptime_s"), ("mms", "watched"), ("mirrors", "held_pages"),
                         ("top", "invalidations_per_s"), ("check", "violations_by_kind"),
                         ("demo", "rounds_skipped")):  # fmt: skip
        out = run(HMMCTL, command, "--help")
        assert out.returncode == 0 and "-j, --json" in out.stdout and key in out.stdout, command
    out = run(HMMCTL, "stat", "mr", "--help")
    assert all(k in out.stdout for k in ("ifindex", "ifname", "lkey", "iova", "mrlen", "comm"))


def test_check_json_is_one_object_on_stdout_and_progress_on_stderr():
    out = run(HMMCTL, "check", "-j", "--seed", "5", "--duration", "1", "--ops", "200",
              "--agents", "1", timeout=120)  # fmt: skip
    [report] = objects(out)
    assert report["violations"] == [] and report["replay"] is None, report
    assert (report["seed"], report["scenario"], report["agents"]) == (5, "none", 1)
    assert report["rounds"] >= 1 and report["translations_checked"] > 0, report  # type: ignore[operator]
    for key in ("elapsed_s", "target_ops", "reads", "page_faults", "invalidations", "stale",
                "evictions", "reads_judged", "violations_by_kind", "notes"):  # fmt: skip
        assert key in report, key
    assert out.stderr.strip(), "progress goes to stderr"
    listed = objects(run(HMMCTL, "-j", "check", "--scenario", "list"))
    assert "none" in {r["name"] for r in listed} and all("help" in r for r in listed)


def test_demo_json_is_one_object_on_stdout():
    out = run(HMMCTL, "demo", "--json", "--duration", "2", "--seed", "3",
              "--check-duration", "0", timeout=120)  # fmt: skip
    [report] = objects(out)
    assert report["violations"] == [] and report["check"] is None, report
    assert report["seed"] == 3 and report["rounds"] >= 1, report  # type: ignore[operator]
    keys = ("elapsed_s", "rounds_skipped", "invalidations", "ack_p50_us", "ack_p99_us", "faults",
            "pages_zapped", "reads", "writes", "refused", "stale", "evictions")  # fmt: skip
    for key in keys:
        assert key in report, key
    assert "hmmirror demo" not in out.stdout and out.stderr.strip()


def test_keys_and_version_as_json(tmp_path):
    [keys] = objects(run(HMMCTL, "keys", "generate", str(tmp_path), "me", "-j"))
    assert keys == {"public": str(tmp_path / "me.key"), "secret": str(tmp_path / "me.key_secret")}
    [ver] = objects(run(HMMCTL, "version", "--json"))
    assert ver["program"] == "hmmctl" and "." in str(ver["protocol"])
    out = run(HMMCTL, "-j", "completion", "bash")
    assert out.returncode == 2 and out.stderr.count("\n") == 1


# --- CURVE keys as flags ----------------------------------------------------------------------


def test_server_key_and_client_key_flags_reach_a_curve_hmmd(tmp_path):
    with curve_hmmd(tmp_path) as rig:
        server, client = rig.server_key, rig.client_key
        out = run(HMMCTL, "status", "-j", "--endpoint", rig.endpoint,
                  "--server-key", server, "--client-key", client, env=NO_KEY_ENV)  # fmt: skip
        assert "epoch" in objects(out)[0]
        out = run(HMMCTL, "--server-key", server, "--client-key", client,
                  "--endpoint", rig.endpoint, "status", env=NO_KEY_ENV)  # fmt: skip
        assert out.returncode == 0, out.stderr
        # A flag beats its environment variable.
        wrong = {"HMMIRROR_SERVER_KEY": str(rig.keys / "nope.key"), "HMMIRROR_CLIENT_KEY": client}
        out = run(HMMCTL, "--endpoint", rig.endpoint, "status", "--server-key", server,
                  env=wrong)  # fmt: skip
        assert out.returncode == 0, out.stderr
        alone = run(HMMCTL, "--endpoint", rig.endpoint, "status", "--server-key", server,
                    env=NO_KEY_ENV)  # fmt: skip
        assert alone.returncode == 2 and "go together" in alone.stderr, alone.stderr
        assert alone.stderr.count("\n") == 1
    helped = run(HMMCTL, "--help")
    assert "--server-key FILE" in helped.stdout and "--client-key FILE" in helped.stdout


# --- completion -------------------------------------------------------------------------------


def test_completion_bash_is_the_docgen_script(tmp_path):
    ours = run(HMMCTL, "completion", "bash")
    docgen = run("hmmirror.tools.docgen", "completion", "bash")
    assert ours.returncode == 0 and ours.stdout == docgen.stdout and ours.stdout
    script = tmp_path / "c.bash"
    script.write_text(ours.stdout)
    done = subprocess.run(
        ["bash", "-c", f"source {script}; COMP_WORDS=(hmmctl status --end); COMP_CWORD=2; "
         "_hmmirror_hmmctl; printf '%s\\n' \"${COMPREPLY[@]}\""],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert done.stdout.split() == ["--endpoint"], "global options complete after the command"


# --- rdma-shaped stat mr ----------------------------------------------------------------------


async def test_stat_mr_show_speaks_rdma(hmmd, puppet):
    addr = await puppet.mmap(4 * PAGE)
    spec = f"{puppet.pid}:{addr:#x}:{4 * PAGE}:rw"
    async with hm_agent(hmmd, spec, f"{puppet.pid}:all:r") as agent, agent.peer() as peer:
        rkey, implicit = agent.rkeys
        await puppet.write(addr, b"z" * PAGE)
        await peer.read(rkey, addr, PAGE)
        base = ["--agent", agent.endpoint, *agent.hmmctl_keys()]
        plain = await arun(HMMCTL, "stat", "mr", "show", *base)
        assert plain.returncode == 0, plain.stderr
        assert plain.stdout == (await arun(HMMCTL, "stat", "mr", *base)).stdout
        rows = json.loads((await arun(HMMCTL, "stat", "mr", "show", "-j", *base)).stdout)
        assert rows == json.loads((await arun(HMMCTL, "-j", "stat", "mr", *base)).stdout)
        assert [list(r)[:3] for r in rows] == [["ifindex", "ifname", "mrn"]] * 2
        assert rows[0]["ifname"] == "mlx5_t" and rows[0]["page_faults"] == 1
        detailed = json.loads((await arun(HMMCTL, "stat", "mr", "-j", "-d", *base)).stdout)
        first, second = detailed
        assert (first["rkey"], first["lkey"], first["iova"]) == (
            f"{rkey:x}", f"{rkey:x}", f"{addr:x}",
        )  # fmt: skip
        assert (first["mrlen"], first["pid"]) == (4 * PAGE, puppet.pid)
        assert first["comm"] == Path(f"/proc/{puppet.pid}/comm").read_text().strip()
        assert (second["rkey"], second["iova"], second["mrlen"]) == (
            f"{implicit:x}",
            "0",
            2**64 - 1,
        )
        text = (await arun(HMMCTL, "-d", "stat", "mr", "show", *base)).stdout.splitlines()
        assert text[0].startswith(
            f"dev mlx5_t mrn {first['mrn']} rkey {rkey:#x} lkey {rkey:#x} iova {addr:#x} "
            f"mrlen {4 * PAGE} pid {puppet.pid} comm {first['comm']} page_faults 1 "
        ), text


# --- hm-agent --log-format --------------------------------------------------------------------


async def test_hm_agent_logs_json_lines_when_told(hmmd, tmp_path):
    async with hm_agent(hmmd, extra=["--log-format", "json"]) as agent:
        pass
    lines = agent.errors.decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records), lines
    assert any("serving" in str(r["msg"]) for r in records), lines


async def test_hm_agent_text_logs_carry_timestamps_and_log_format_is_a_setting(hmmd, tmp_path):
    async with hm_agent(hmmd) as agent:
        pass
    first = agent.errors.decode().splitlines()[0]
    assert first[:4].isdigit() and first[10] == "T" and " hmmirror." in first, first
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'listen = "ipc://{tmp_path}/a.sock"\nlog_format = "xml"\n')
    out = await arun(HM_AGENT, "--config", str(cfg), "check-config")
    assert out.returncode == 2 and "log_format must be 'text' or 'json'" in out.stderr, out.stderr
    cfg.write_text(f'listen = "ipc://{tmp_path}/a.sock"\nlog_format = "json"\n')
    assert (await arun(HM_AGENT, "--config", str(cfg), "check-config")).returncode == 0
    flagged = await arun(HM_AGENT, "--log-format", "xml", "check-config")
    assert flagged.returncode == 2 and "--log-format" in flagged.stderr


async def test_hm_agent_log_format_from_its_config_file(hmmd, tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('log_format = "json"\n')
    async with hm_agent(hmmd, extra=["--config", str(cfg)]) as agent:
        pass
    assert all(json.loads(line)["msg"] for line in agent.errors.decode().splitlines())


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_reader_that_goes_away_ends_hmmctl_quietly(buffered):
    """``hmmctl ... | head``: stdout's reader gone before hmmctl writes; it stops with the
    status SIGPIPE gives (141), and no traceback, whether its stdout is block-buffered (a
    pipe, CI's clean environment) or not (PYTHONUNBUFFERED, as here)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [PY, "-m", HMMCTL, "completion", "bash"], stdout=write_end, stderr=subprocess.PIPE,
            text=True, timeout=30, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""
