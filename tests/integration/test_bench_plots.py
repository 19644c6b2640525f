"""The soak benchmark's PNGs: a short real soak (hmmd, churning targets, an agent; run by
``test_bench_scaling``) writes its two plots where ``--plots`` says, as PNGs that decode to
the size drawn (``assert_soak_plots``), and the default directory keeps them out of git."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path: str) -> tuple[int, int]:
    """Width and height from a PNG's IHDR, after checking the signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG and head[12:16] == b"IHDR", f"{path} is no PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def assert_soak_plots(stdout: str, where: Path) -> None:
    """The soak's two plots were written to ``where`` (``--plots``), said so in ``stdout``,
    and decode to the size drawn, not blank. A short real soak makes them: the one that
    ``test_bench_scaling`` runs (a soak of its own here cost 10 s of every test run)."""
    rate, trips = where / "soak-rate.png", where / "soak-round-trip.png"
    assert f"[soak] plots: {rate}, {trips}" in stdout, stdout[-3000:]
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
