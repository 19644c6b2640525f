"""Every hmmirror distribution has one version (VERSION), pins its siblings to it, and ships
its license, its own README and a ``py.typed`` marker (PEP 561)."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from hmmirror.daemon import __version__ as daemon_version

ROOT = Path(__file__).resolve().parents[2]
#: Each distribution's directory and the packages under its src/hmmirror/.
DISTRIBUTIONS = {
    "proto": ["proto"],
    "transport": ["transport"],
    "daemon": ["daemon"],
    "client": ["client"],
    "tools": ["tools", "testing"],
}
VERSION = (ROOT / "VERSION").read_text().strip()


def _project(directory: str) -> dict[str, object]:
    with open(ROOT / directory / "pyproject.toml", "rb") as f:
        data = tomllib.load(f)
    return dict(data)


def test_version_file_holds_one_release_version() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", VERSION), VERSION


@pytest.mark.parametrize("directory", DISTRIBUTIONS)
def test_each_distribution_reads_the_one_version_and_pins_its_siblings_to_it(
    directory: str,
) -> None:
    data = _project(directory)
    project = data["project"]
    assert isinstance(project, dict)
    assert "version" not in project and project["dynamic"] == ["version"]
    hatch = data["tool"]["hatch"]["version"]  # type: ignore[index]
    assert hatch == {"path": "../VERSION", "pattern": "(?P<version>.+)"}
    ours = [d for d in project["dependencies"] if d.startswith("hmmirror-")]
    assert bool(ours) == (directory != "proto"), f"{directory}: {ours}"  # proto needs none
    for requirement in ours:
        assert requirement.endswith(f"=={VERSION}"), f"{directory}: {requirement} is not pinned"


@pytest.mark.parametrize("directory", DISTRIBUTIONS)
def test_each_distribution_ships_license_readme_and_py_typed(directory: str) -> None:
    project = _project(directory)["project"]
    assert isinstance(project, dict)
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / directory / "LICENSE").resolve() == (ROOT / "LICENSE").resolve()
    assert (ROOT / directory / project["readme"]).is_file()
    assert "Typing :: Typed" in project["classifiers"]
    for package in DISTRIBUTIONS[directory]:
        assert (ROOT / directory / "src" / "hmmirror" / package / "py.typed").is_file(), package


def test_installed_distributions_and_the_workspace_carry_that_version() -> None:
    """What ``--version`` prints comes from the installed metadata, hence from VERSION."""
    for directory in DISTRIBUTIONS:
        assert importlib.metadata.version(f"hmmirror-{directory}") == VERSION, directory
    assert daemon_version == VERSION
    workspace = _project(".")["project"]
    assert isinstance(workspace, dict)
    assert workspace["version"] == VERSION, "the workspace's own version must equal VERSION"
