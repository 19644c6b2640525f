"""Log lines: UTC-stamped text, journald's priority prefixes when stderr is the journal,
and JSON with the structured fields."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
from hmmirror.daemon import logfmt


def _record(level: int, msg: str, exc: bool = False, **extra: object) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            info = sys.exc_info()
    record = logging.LogRecord("hmmirror.daemon.x", level, __file__, 1, msg, (), info)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_text_lines_carry_a_utc_timestamp_the_level_and_the_fields() -> None:
    line = logfmt.TextFormatter().format(
        _record(logging.WARNING, "evicting", session=3, agent="nic0", pid=42)
    )
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z warning hmmirror\.daemon\.x: evicting "
        r"\[session=3 agent=nic0 pid=42\]",
        line,
    ), line


def test_journal_lines_start_with_the_priority_on_every_line_and_carry_no_timestamp() -> None:
    text = logfmt.TextFormatter(journal=True).format(_record(logging.ERROR, "failed", exc=True))
    lines = text.splitlines()
    assert lines[0] == "<3>error hmmirror.daemon.x: failed"
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)
    info = logfmt.TextFormatter(journal=True).format(_record(logging.INFO, "ok"))
    assert info == "<6>info hmmirror.daemon.x: ok"


def test_json_lines_carry_the_fields(tmp_path: Path) -> None:
    entry = json.loads(
        logfmt.JsonFormatter().format(_record(logging.INFO, "opened", session=1, peer="uid:0"))
    )
    assert entry["level"] == "info" and entry["msg"] == "opened"
    assert entry["session"] == 1 and entry["peer"] == "uid:0" and "pid" not in entry


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown log fields"):
        logfmt.fields(sesion=1)


def test_the_journal_is_recognised_by_the_streams_device_and_inode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd's JOURNAL_STREAM names the stream it connected; one redirected elsewhere
    (another inode) is not the journal."""
    with open(tmp_path / "stream", "w") as stream, open(tmp_path / "other", "w") as other:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logfmt.journal_is(stream)
        assert not logfmt.journal_is(other)
        logfmt.configure("info", "text", stream)
        logging.getLogger("hmmirror.test").warning("seen")
        stream.flush()
        logfmt.configure("warning", "text")  # back to stderr
    assert (tmp_path / "stream").read_text() == "<4>warning hmmirror.test: seen\n"
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    with open(tmp_path / "stream") as stream:
        assert not logfmt.journal_is(stream)
