"""``hmmctl check --until-judged N``: the rounds stop once N operations are judged or logged
to be, well before the hour that ``--until-judged`` gives ``--duration`` by default; the
report says how many were judged, how fast, and the checker's own CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HMMCTL = [sys.executable, "-m", "hmmirror.tools.ctlapp"]


@pytest.mark.timeout(300)
def test_a_check_stops_once_it_has_judged_enough() -> None:
    out = subprocess.run(
        [*HMMCTL, "check", "--seed", "5", "--agents", "2", "--until-judged", "400", "-j"],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["violations"] == []
    # Stopped by the count, not by the hour: judged may overshoot by the last round's worth.
    assert report["judged"] >= 400, report
    # The stop counts only what is sure to be judged: atomics come on top of N.
    assert report["translations_checked"] + report["reads_judged"] >= 400, report
    parts = ("translations_checked", "reads_judged", "atomics_judged")
    assert report["judged"] == sum(report[k] for k in parts)
    assert report["elapsed_s"] < 240
    assert report["checker_cpu_s"] > 0
    # The progress lines (stderr under -j) count what is judged round by round.
    assert "operations judged or logged to judge" in out.stderr
