"""deploy/README.md's two-host walkthrough, run exactly as written (its ```sh block)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.multinode
REPO = Path(__file__).resolve().parents[2]


def walkthrough() -> str:
    text = (REPO / "deploy" / "README.md").read_text()
    start = text.index("```sh", text.index("## Two hosts on one machine")) + len("```sh\n")
    return text[start : text.index("```", start)]


def test_the_deploy_walkthrough_works_as_written():
    script = "set -e\n" + walkthrough()
    try:
        out = subprocess.run(
            ["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
        )
    finally:  # whatever happened, leave no namespace, process or file behind
        subprocess.run(["pkill", "-f", "tcp://10.231.0.1:5555"], check=False)
        subprocess.run(["pkill", "-f", "/tmp/hmm-demo"], check=False)
        for ns in ("hostA", "hostB"):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", "/tmp/hmm-demo"], check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "b'hello, host B'" in out.stdout
    assert "dev mlx5_0 mrn 1 page_faults" in out.stdout
