"""The atheris fuzz target of the decoder (``bench/fuzz.py``), run briefly as CI does.

A 10-second run must execute inputs and find no crash; a run with a planted
bug must report a crash and save an input that reproduces it, so a harness
that swallowed failures could not pass here.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "bench" / "fuzz.py"
#: A subprocess gets this long beyond its fuzzing time before the test gives up on it.
SLACK = 60


def _load() -> ModuleType:
    """Import bench/fuzz.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("hmmirror_bench_fuzz", FUZZ)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fuzz = _load()


def _run(*args: str, seconds: int) -> tuple[int, str, dict[str, Any] | None]:
    """Run bench/fuzz.py; return its exit status, output and JSON summary (if printed)."""
    proc = subprocess.run(
        [sys.executable, str(FUZZ), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=seconds + SLACK,
        check=False,
    )
    out = proc.stdout + proc.stderr
    summary = None
    for line in out.splitlines():
        if line.startswith("FUZZ-JSON "):
            summary = json.loads(line[len("FUZZ-JSON ") :])
    return proc.returncode, out, summary


@pytest.fixture(scope="module")
def atheris_present() -> None:
    """Skip, saying why, where atheris has no wheel (it is a dev dependency on Linux x86_64)."""
    pytest.importorskip(
        "atheris", reason="atheris is not installed: its wheels exist for Linux x86_64 only"
    )


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(st.binary(max_size=300), max_size=6))
def test_input_format_round_trips(frames: list[bytes]) -> None:
    """``split_frames`` inverts ``join_frames``, so seeds reach the decoder as encoded."""
    assert fuzz.split_frames(fuzz.join_frames(frames)) == frames


def test_seeds_cover_every_message_type_and_decode() -> None:
    """Every type is seeded, and every seed passes the target's checks."""
    from hmmirror.proto import decode
    from hmmirror.proto import messages as M

    seeds = fuzz.seed_messages()
    seen = {decode(fuzz.split_frames(fuzz.join_frames(s))).type for s in seeds}
    assert seen == set(M.TYPES)
    target = fuzz.FuzzTarget()
    for s in seeds:
        target(fuzz.join_frames(s))
    assert target.tally == {"accepted": len(seeds)}


def test_fuzz_target_runs_clean_for_10_seconds(atheris_present: None) -> None:
    """The CI run: inputs are executed, coverage grows past the seeds, nothing crashes."""
    rc, out, summary = _run("--seconds", "10", "--json", seconds=10)
    assert summary is not None, f"no summary printed (exit {rc}):\n{out[-3000:]}"
    assert summary["crashes"] == 0, f"the decoder fuzzer found a crash:\n{out[-6000:]}"
    assert rc == 0, f"exit {rc}:\n{out[-3000:]}"
    assert summary["executions"] > 0, out[-3000:]
    assert summary["coverage"] > 0, "atheris saw no coverage: is hmmirror.proto instrumented?"
    print(out[out.find("fuzz summary") :])


def test_fuzz_harness_reports_a_planted_crash(atheris_present: None, tmp_path: Path) -> None:
    """With ``--plant-bug`` the run must fail, and the saved input must reproduce it."""
    artifacts = tmp_path / "crashes"
    rc, out, summary = _run(
        "--seconds", "10", "--json", "--plant-bug", "--artifacts", str(artifacts), seconds=10
    )
    assert rc == 1, f"a crash must exit 1, got {rc}:\n{out[-3000:]}"
    assert summary is not None and summary["crashes"] == 1, out[-3000:]
    crash = Path(summary["crash_files"][0])
    assert crash.parent == artifacts and crash.exists()
    assert "planted bug" in out
    again = subprocess.run(
        [sys.executable, str(FUZZ), "--reproduce", str(crash), "--plant-bug"],
        capture_output=True,
        text=True,
        timeout=SLACK,
        check=False,
    )
    assert again.returncode != 0 and "planted bug" in again.stderr, again.stderr[-2000:]
    clean = subprocess.run(
        [sys.executable, str(FUZZ), "--reproduce", str(crash)],
        capture_output=True,
        text=True,
        timeout=SLACK,
        check=False,
    )
    assert clean.returncode == 0, clean.stdout + clean.stderr
