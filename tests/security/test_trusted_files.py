"""Files that configure hmmd (and hm-agent, hmmctl) must be root's or their own user's, and
writable by no one else.

hmmd acts for every user. Its config file, its policy of grants, its CURVE secret key and
the allow-list of agents' public keys decide who may do what; a file another user owns (or
may write) lets that user decide instead, for instance after swapping it in a directory they
could write. Each is refused here with one line, or, for one key of the allow-list, skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hmmirror.transport.keys import AllowDir, generate

HMMD = [sys.executable, "-m", "hmmirror.daemon"]


def check_config(directory: Path, text: str) -> subprocess.CompletedProcess[str]:
    """``hmmd --config FILE check-config`` with ``text`` as its file (root's, mode 0644)."""
    config = directory / "hmmd.toml"
    config.write_text("[hmmd]\n" + text)
    return subprocess.run([*HMMD, "--config", str(config), "check-config"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


@pytest.fixture(params=["another user's", "writable by others"])
def spoiled(request: Any, make_user: Any) -> Any:
    """Make a path untrustworthy the parametrised way."""
    mallory = make_user()

    def spoil(path: Path) -> str:
        if request.param == "another user's":
            os.chown(path, mallory.uid, mallory.gid)
            return f"belongs to uid {mallory.uid}"
        path.chmod(path.stat().st_mode | 0o002)
        return "others may write it"

    return spoil


def test_a_policy_file_hmmd_cannot_trust_is_refused(tmp_path: Path, spoiled: Any) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[[grant]]\nagents = ["uid:0"]\naccess = ["read"]\n')
    says = spoiled(policy)
    out = check_config(tmp_path, f'policy = "{policy}"\n')
    assert out.returncode == 2 and says in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1, out.stderr


def test_a_config_file_hmmd_cannot_trust_is_refused(tmp_path: Path, spoiled: Any) -> None:
    config = tmp_path / "hmmd.toml"
    config.write_text("[hmmd]\nack_deadline = '2s'\n")
    says = spoiled(config)
    out = subprocess.run([*HMMD, "--config", str(config), "check-config"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, out


def test_a_secret_key_hmmd_cannot_trust_is_refused_and_an_allowed_key_skipped(
    tmp_path: Path, make_user: Any
) -> None:
    mallory = make_user()
    public, secret = generate(str(tmp_path), "hmmd")
    os.chown(secret, mallory.uid, mallory.gid)
    allow = tmp_path / "allow"
    allow.mkdir()
    mine, _ = generate(str(tmp_path), "mine")
    theirs, _ = generate(str(tmp_path), "theirs")
    for key in (mine, theirs):
        os.rename(key, allow / os.path.basename(key))
    os.chown(allow / "theirs.key", mallory.uid, mallory.gid)
    out = check_config(
        tmp_path,
        f'endpoint = "tcp://127.0.0.1:0"\ncurve_key = "{secret}"\ncurve_allow = "{allow}"\n',
    )
    assert out.returncode == 2 and f"belongs to uid {mallory.uid}" in out.stderr, out.stderr
    listed = AllowDir(str(allow))
    text = {name: (allow / name).read_text() for name in ("mine.key", "theirs.key")}
    key_of = {n: t.split('public-key = "')[1].split('"')[0].encode() for n, t in text.items()}
    assert listed.allows(key_of["mine.key"]) and not listed.allows(key_of["theirs.key"])
    del public
