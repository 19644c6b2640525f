"""The soak benchmark's PNGs: a short real soak (hmmd, a churning target, an agent) writes
its two plots where ``--plots`` says, as PNGs that decode to the size drawn."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path: str) -> tuple[int, int]:
    """Width and height from a PNG's IHDR, after checking the signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG and head[12:16] == b"IHDR", f"{path} is no PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_short_soak_writes_its_rate_and_round_trip_plots(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "run.py"), "--only", "soak",
         "--soak-seconds", "5", "--soak-agents", "1", "--soak-rate", "300",
         "--soak-threads", "1", "--soak-pages", "64", "--soak-target-procs", "1",
         "--soak-warmup", "1", "--soak-check-every", "5", "--idle-wait", "0",
         "--plots", str(tmp_path)],
        capture_output=True, text=True, timeout=200, cwd=REPO,
    )  # fmt: skip
    rate, trips = tmp_path / "soak-rate.png", tmp_path / "soak-round-trip.png"
    assert f"[soak] plots: {rate}, {trips}" in out.stdout, out.stdout[-3000:] + out.stderr
    from matplotlib.image import imread

    for path, (width, height) in ((rate, (880, 440)), (trips, (1210, 440))):
        assert _png_size(str(path)) == (width, height)
        pixels = imread(str(path))
        assert pixels.shape[:2] == (height, width)
        assert pixels.std() > 0.05, f"{path} is blank"


def test_the_default_directory_keeps_the_pngs_out_of_git():
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        import plots
    finally:
        sys.path.pop(0)
    where = plots.plots_dir()
    assert where == os.path.join(REPO, "bench", "out")
    png = os.path.join(where, "soak-rate.png")
    ignored = subprocess.run(["git", "check-ignore", "-q", png], cwd=REPO)
    assert ignored.returncode == 0, "bench/out's PNGs must be ignored by git"
