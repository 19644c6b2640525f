"""The fault benchmark's rows come out measured: a few runs of a small fault-in (real hmmd
pair, a real target), through both daemons it starts, the physical-frame one and the
frame-token one, which watch the same target on purpose. Not the figures (benchmarks are not
tests): that every row has one, and nothing failed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(180)
def test_the_fault_rows_are_measured_through_both_daemons():
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "run.py"), "--only", "fault",
         "--fault-size", "16M", "--fault-runs", "3", "--idle-wait", "0"],
        capture_output=True, text=True, timeout=150, cwd=REPO,
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert "side failed" not in text, text[-3000:]
    for row in ("fault 16 MiB (fresh mirror, best)", "fault 16 MiB (after sync_range, median)",
                "fault 16 MiB frame tokens / physical (fresh mirror, median)",
                "fault 16 MiB frame tokens / physical (after sync_range, median)"):  # fmt: skip
        assert re.search(rf"\| {re.escape(row)} *\| \d+\.\d\d ms ", text), (row, text[-3000:])
