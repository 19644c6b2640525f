"""The soak's churn from several target processes, and the scaling benchmark: one short real
run of each (hmmd, churning targets, an agent mirroring every target) prints its rows, with
every target registered with hmmd, churning, and checked coherent at the end."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_soak_on_two_target_processes_and_the_scaling_rows(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "run.py"), "--only", "soak",
         "--only", "scaling", "--soak-target-procs", "2", "--scaling-targets", "2",
         "--soak-seconds", "3", "--soak-agents", "1", "--soak-rate", "300",
         "--scaling-rate", "600", "--soak-threads", "2", "--soak-pages", "128",
         "--soak-warmup", "1", "--soak-check-every", "5", "--idle-wait", "0",
         "--plots", str(tmp_path)],
        capture_output=True, text=True, timeout=200, cwd=REPO,
    )  # fmt: skip
    text = out.stdout + out.stderr
    # The soak: two target processes, both exposed to hmmd, both churning, checked coherent.
    assert "uffd (2 of 2 targets exposed their userfaultfd)" in text, text[-4000:]
    assert "2 target processes (64 pages, 1 threads each)" in text, text[-4000:]
    ops = re.search(r"\[soak\] target: .*; ops per target \[(\d+), (\d+)\]", text)
    assert ops and all(int(n) > 0 for n in ops.groups()), text[-4000:]
    coherent = r"\| soak: coherence violations \(translation oracle\) *\| 0 .*\| PASS"
    assert re.search(coherent, text), text[-4000:]
    # The scaling benchmark: both cases measured on one hmmd, their ratio, and coherence.
    for row in ("scaling: 1 target x 1 agents, aggregate inval/s",
                "scaling: 2 targets x 1 agents, aggregate inval/s",
                "scaling: 2 targets / 1 target, aggregate inval/s"):  # fmt: skip
        assert re.search(rf"\| {re.escape(row)} *\| [1-9]\d*/s ", text), (row, text[-4000:])
    coherent = r"\| scaling: coherence violations \(translation oracle\) *\| 0 .*\| PASS"
    assert re.search(coherent, text), text[-4000:]
