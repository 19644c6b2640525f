"""Code quality gates: docstring coverage (interrogate) and lint (ruff) stay clean.

Both tools run as subprocesses of this interpreter, from the repository root,
so the gates read the root ``pyproject.toml`` exactly as CI and developers do.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ARGS`` in the repository root, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_docstring_coverage() -> None:
    """interrogate meets the root config's ``fail-under`` on the five packages."""
    # -c: without it interrogate picks the pyproject.toml nearest the paths (client's).
    result = _run(
        "interrogate",
        "-c",
        "pyproject.toml",
        "proto/src",
        "transport/src",
        "daemon/src",
        "client/src",
        "tools/src",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_clean() -> None:
    """ruff finds nothing to report in the packages and the tests."""
    result = _run("ruff", "check", "proto", "transport", "daemon", "client", "tools", "tests")
    assert result.returncode == 0, result.stdout + result.stderr
