"""``hmmctl status`` prints what hmmd said, and some of it quotes what a peer or a target
chose (``uffd_last_refusal``): control characters reach the terminal escaped."""

from __future__ import annotations

import argparse

import pytest
from hmmirror.tools.ctlinspect import _show_status


def test_status_text_reaches_the_terminal_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(json=False)
    _show_status(args, {"sessions": 1, "uffd_last_refusal": "no\x1b]0;owned\x07\nforged: 1"})
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert [line.split()[0] for line in out.splitlines()] == ["sessions", "uffd_last_refusal"]
