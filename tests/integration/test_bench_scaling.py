"""The soak's churn from several target processes, and the scaling benchmark: one short real
run of both (hmmd, churning targets, an agent mirroring every target) prints their rows, with
every target registered with hmmd, churning, and checked coherent at the end; and the same run
over two hmmd instances (``--soak-daemons 2 --scaling-daemons 2``), each serving the
invalidations of the target it owns."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .test_bench_plots import assert_soak_plots

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def soak_and_scaling(tmp_path: Path, daemons: int) -> str:
    """A few seconds of the soak on two target processes and of the scaling benchmark (1 and
    2 targets), both over ``daemons`` hmmds; their output, with the rows every run must show:
    two targets exposed and churning, the scaling rows, coherence in both."""
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "run.py"), "--only", "soak",
         "--only", "scaling", "--soak-target-procs", "2", "--scaling-targets", "2",
         "--soak-daemons", str(daemons), "--scaling-daemons", str(daemons),
         "--soak-seconds", "3", "--soak-agents", "1", "--soak-rate", "300",
         "--scaling-rate", "600", "--soak-threads", "2", "--soak-pages", "128",
         "--soak-warmup", "1", "--soak-check-every", "5", "--idle-wait", "0",
         "--plots", str(tmp_path)],
        capture_output=True, text=True, timeout=200, cwd=REPO,
    )  # fmt: skip
    text = out.stdout + out.stderr
    hmmds = f", {daemons} hmmds" if daemons > 1 else ""
    # The soak: two target processes, both exposed to hmmd, both churning, checked coherent.
    assert "uffd (2 of 2 targets exposed their userfaultfd)" in text, text[-4000:]
    assert "2 target processes (64 pages, 1 threads each)" in text, text[-4000:]
    ops = re.search(r"\[soak\] target: .*; ops per target \[(\d+), (\d+)\]", text)
    assert ops and all(int(n) > 0 for n in ops.groups()), text[-4000:]
    held = rf"\| soak 1 agents, 2 targets{hmmds}: inval/s held, min 5 s window *\| [1-9]\d*/s "
    assert re.search(held, text), text[-4000:]
    coherent = r"\| soak: coherence violations \(translation oracle\) *\| 0 .*\| PASS"
    assert re.search(coherent, text), text[-4000:]
    # The scaling benchmark: both cases measured on the same hmmd(s), their ratio, coherence.
    for row in (f"scaling: 1 target x 1 agents{hmmds}, aggregate inval/s",
                f"scaling: 2 targets x 1 agents{hmmds}, aggregate inval/s",
                f"scaling: 2 targets / 1 target{hmmds}, aggregate inval/s"):  # fmt: skip
        assert re.search(rf"\| {re.escape(row)} *\| [1-9]\d*/s ", text), (row, text[-4000:])
    coherent = r"\| scaling: coherence violations \(translation oracle\) *\| 0 .*\| PASS"
    assert re.search(coherent, text), text[-4000:]
    return text


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_soak_on_two_target_processes_and_the_scaling_rows(tmp_path):
    text = soak_and_scaling(tmp_path, 1)
    assert "hmmd instances" not in text, text[-4000:]
    assert_soak_plots(text, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_soak_and_scaling_over_two_hmmds_each_serving_the_targets_it_owns(tmp_path):
    text = soak_and_scaling(tmp_path, 2)
    # The two targets spread one to each instance (soak, and scaling's second case).
    assert text.count("targets per instance [1, 1]") == 2, text[-4000:]
    # Each instance served the invalidations of the target it owns. The agent's group found
    # each owner at registration, following MOVED where the pid picks the other instance (at
    # most once per target), so no MOVED is answered while the churn is measured.
    share = re.search(
        r"\* scaling: 2 targets x 1 agents, 2 hmmds, aggregate inval/s: .*; 2 hmmd instances: "
        r"#0 (\d+) inval .*; #1 (\d+) inval .*; MOVED answered (\d+), followed by the agents' "
        r"groups (\d+)",
        text,
    )
    assert share, text[-4000:]
    first, second, moved, follows = (int(n) for n in share.groups())
    assert first > 0 and second > 0, share.group(0)
    assert moved == 0 and follows <= 2, share.group(0)
