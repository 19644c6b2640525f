"""Man pages and bash completion come from the programs' parsers and stay current."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hmmirror.tools import docgen

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "docs" / "man"


def test_the_committed_man_pages_are_what_the_parsers_generate(tmp_path: Path) -> None:
    """docs/man/ is regenerated with ``python -m hmmirror.tools.docgen man docs/man``."""
    docgen.write_manpages(str(tmp_path))
    for program in docgen.PROGRAMS:
        name = f"{program.name}.{program.section}"
        assert (tmp_path / name).read_text() == (MAN / name).read_text(), (
            f"docs/man/{name} is stale: run python -m hmmirror.tools.docgen man docs/man"
        )


@pytest.mark.parametrize("program", docgen.PROGRAMS, ids=lambda p: p.name)
def test_each_page_renders_without_warnings_and_names_every_option(
    program: docgen.Program,
) -> None:
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed (Debian package groff-base): pages not rendered")
    page = MAN / f"{program.name}.{program.section}"
    out = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", str(page)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr
    # grotty's bold is overstrike (char, backspace, char); hyphens may come out as U+2010.
    text = re.sub(".\b", "", out.stdout).replace("\u2010", "-").replace("\u2212", "-")
    parser = program.parser()
    for action in parser._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert flag in text, f"{program.name}: {flag} is missing from its page"


def _complete(script: Path, line: str) -> list[str]:
    """What bash completes for ``line`` (a trailing space starts a new word)."""
    words = line.split()
    if line.endswith(" "):
        words.append("")
    fn = "_hmmirror_" + words[0].replace("-", "_")
    quoted = " ".join(f"'{w}'" for w in words)
    out = subprocess.run(
        ["bash", "-c", f"source {script}; COMP_WORDS=({quoted}); "
         f"COMP_CWORD={len(words) - 1}; {fn}; printf '%s\\n' \"${{COMPREPLY[@]}}\""],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return out.stdout.split()


def test_bash_completes_commands_and_options_past_option_values(tmp_path: Path) -> None:
    script = tmp_path / "hmmirror.bash"
    done = subprocess.run(
        [sys.executable, "-m", "hmmirror.tools.docgen", "completion", "bash"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    script.write_text(done.stdout)
    assert _complete(script, "hmmctl st") == ["status", "stat"]
    assert _complete(script, "hmmctl --endpoint ipc:///x/hmmd.sock mi") == ["mirrors"]
    assert "mr" in _complete(script, "hmmctl stat ")
    assert _complete(script, "hmmd run --poll") == ["--poll-interval", "--poll-max"]
    assert "--listen" in _complete(script, "hm-agent --l")
