"""The agent library stands alone: ``pip install ./proto ./transport ./client`` is a working agent.

An implementer installs hmmirror-client (with the two packages it depends on) into a venv of their
own, with nothing of hmmd or of the tools, and runs the README's agent example against an hmmd that
runs elsewhere (here: the test's hmmd, from the project's environment). The example is taken from
README.md as written, so the README cannot drift from what the library does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = 4096

#: Seconds for uv to build and install three small wheels (their dependencies come from uv's cache).
INSTALL_DEADLINE = 240.0


def _uv() -> str:
    """The uv that ``./hmmirror test`` runs under (``uv run`` sets $UV), else one on PATH."""
    uv = os.environ.get("UV") or next(
        (str(p) for p in sorted((ROOT / ".tools").glob("uv-*/uv"))), None
    )
    if uv is None:
        pytest.fail("no uv: run the tests through ./hmmirror test", pytrace=False)
    return uv


def _readme_agent_example() -> str:
    """The README's first ``hmmirror.client`` example, as an implementer would copy it."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(
        r"An agent \(`hmmirror.client`, asyncio\):\n\n```python\n(.*?)```", readme, re.S
    )
    assert found, "README.md no longer has the agent example this test runs"
    return found.group(1)


def _as_program(example: str, endpoint: str) -> str:
    """The example in a main(pid, start, length) (and ``end``) that prints what it saw as JSON."""
    imports, _, body = example.partition("\n\n")
    if not body:  # the example is one block: its import lines come first
        lines = example.splitlines()
        imports = "\n".join(line for line in lines if line.startswith(("from ", "import ")))
        body = "\n".join(line for line in lines if not line.startswith(("from ", "import ")))
    body = body.replace("ipc:///run/hmmirror/hmmd.sock", endpoint)
    report = (
        "print(json.dumps({'data': bytes(r.data[:64]).hex(), 'cpages': r.cpages,"
        " 'written': w.cpages, 'prot': list(prot), 'valid': int(mirror.table[0]),"
        " 'counters': dict(mirror.counters)}, default=int))"
    )
    return (
        "import asyncio, json, sys\n"
        f"{imports}\n\n"
        "async def main(pid: int, start: int, length: int) -> None:\n"
        "    end = start + length\n"
        f"{textwrap.indent(body, '    ')}\n"
        f"        {report}\n\n"
        "asyncio.run(main(*map(int, sys.argv[1:4])))\n"
    )


@pytest.fixture(scope="module")
def library_only_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh venv holding only hmmirror-proto, -transport and -client (and their dependencies)."""
    uv = _uv()
    venv = tmp_path_factory.mktemp("agent-venv") / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    env = {**os.environ, "VIRTUAL_ENV": str(venv)}
    env.pop("UV_PROJECT_ENVIRONMENT", None)
    for argv in (
        [uv, "venv", "--quiet", "--python", base, str(venv)],
        [
            uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
            str(ROOT / "proto"), str(ROOT / "transport"), str(ROOT / "client"),
        ],
    ):  # fmt: skip
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=INSTALL_DEADLINE, check=False
        )
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr[-2000:]}"
    return str(venv / "bin" / "python")


def test_the_library_alone_installs_without_daemon_or_tools(library_only_python: str) -> None:
    """The venv has the agent library, and neither hmmd nor the tools came with it."""
    probe = (
        "import importlib.util as u, json;"
        "print(json.dumps({m: u.find_spec(m) is not None for m in"
        " ('hmmirror.client', 'hmmirror.client.mlx5', 'hmmirror.daemon', 'hmmirror.tools',"
        " 'hmmirror.testing')}))"
    )
    out = subprocess.run(
        [library_only_python, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(out.stdout) == {
        "hmmirror.client": True,
        "hmmirror.client.mlx5": True,
        "hmmirror.daemon": False,
        "hmmirror.tools": False,
        "hmmirror.testing": False,
    }


async def test_the_readme_agent_example_runs_from_the_library_alone(
    library_only_python: str, hmmd: object, puppet: object
) -> None:
    """The README's example, copied as written, mirrors a page of a live process and reads it."""
    from hmmirror.testing.puppet import Puppet

    assert isinstance(puppet, Puppet)
    addr = await puppet.mmap(4 * PAGE, "rw")
    await puppet.write(addr, b"\x5a" * 16)
    program = _as_program(_readme_agent_example(), hmmd.endpoint)  # type: ignore[attr-defined]
    done = subprocess.run(
        [library_only_python, "-c", program, str(puppet.pid), str(addr), str(4 * PAGE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd="/",  # nothing of the checkout on sys.path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["data"].startswith("5a" * 16), seen
    assert seen["cpages"] == 4 and seen["written"] == 1, seen
    assert seen["valid"] == 0, "sync_range returned with a valid entry left in the page table"
    assert seen["counters"]["page_invalidations"] >= 1, seen
    assert seen["counters"]["page_faults"] >= 1, seen


def test_the_installed_library_is_typed_licensed_and_of_the_one_version(
    library_only_python: str,
) -> None:
    """Built wheels (not the workspace's editable installs) carry ``py.typed``, the LICENSE,
    the version of the repository's VERSION file, and pin each other to it."""
    probe = (
        "import importlib.metadata as m, importlib.util as u, json, os;"
        "names = ('proto', 'transport', 'client');"
        "print(json.dumps({n: {"
        " 'version': m.version(f'hmmirror-{n}'),"
        " 'license': m.metadata(f'hmmirror-{n}')['License-Expression'],"
        " 'license_file': any(str(f).endswith('LICENSE') for f in m.files(f'hmmirror-{n}')),"
        " 'requires': sorted(r for r in (m.requires(f'hmmirror-{n}') or [])"
        "                    if r.startswith('hmmirror-')),"
        " 'typed': os.path.isfile(os.path.join("
        "     os.path.dirname(u.find_spec(f'hmmirror.{n}').origin), 'py.typed')),"
        "} for n in names}))"
    )
    out = subprocess.run(
        [library_only_python, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    version = (ROOT / "VERSION").read_text().strip()
    pin = f"=={version}"
    assert json.loads(out.stdout) == {
        "proto": {"version": version, "license": "MIT", "license_file": True, "requires": [],
                  "typed": True},
        "transport": {"version": version, "license": "MIT", "license_file": True,
                      "requires": [f"hmmirror-proto{pin}"], "typed": True},
        "client": {"version": version, "license": "MIT", "license_file": True,
                   "requires": [f"hmmirror-proto{pin}", f"hmmirror-transport{pin}"],
                   "typed": True},
    }  # fmt: skip
