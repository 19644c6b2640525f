"""Fixtures for attack tests: real other users, and an hmmd they can reach.

Every attack in ``tests/security`` runs as a real second user (created here with
``useradd`` and removed afterwards, whatever the test's outcome) or as a raw
ZeroMQ peer. A user's processes run under ``setpriv --reuid --regid``, with the
repository's interpreter, so they import the same hmmirror the test does.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

#: How long a user's helper process gets to answer before the test fails.
USER_DEADLINE = 30.0


@dataclass
class User:
    """A throwaway Unix user (and its own group), removed when the test ends."""

    name: str
    uid: int
    gid: int
    groups: tuple[str, ...] = ()
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def argv(self, *cmd: str) -> list[str]:
        """``cmd`` under setpriv as this user, with exactly its groups."""
        return [
            "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
            "--inh-caps=-all", "--", *cmd,
        ]  # fmt: skip

    @staticmethod
    def python(code: str, *args: str) -> list[str]:
        """The test's interpreter running ``code``: a command for ``run`` or ``popen``."""
        return [sys.executable, "-c", code, *args]

    def run(self, cmd: Sequence[str], timeout: float = USER_DEADLINE, **kw: Any) -> Any:
        """Run ``cmd`` as this user to completion; the CompletedProcess (text)."""
        return subprocess.run(
            self.argv(*cmd), capture_output=True, text=True, timeout=timeout, **kw
        )

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
        """Start ``cmd`` as this user (stdin and stdout piped, text); killed at teardown."""
        kw.setdefault("stdin", subprocess.PIPE)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(self.argv(*cmd), text=True, **kw)
        self.procs.append(proc)
        return proc


def _remove_user(user: User) -> None:
    """Kill everything the user still runs, then delete the user and its group."""
    for proc in user.procs:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    subprocess.run(["pkill", "-KILL", "-U", str(user.uid)], capture_output=True, check=False)
    for _ in range(50):
        if subprocess.run(["pgrep", "-U", str(user.uid)], capture_output=True).returncode:
            break
        time.sleep(0.1)
    subprocess.run(["userdel", user.name], capture_output=True, check=False)
    with contextlib.suppress(KeyError):
        grp.getgrnam(user.name)
        subprocess.run(["groupdel", user.name], capture_output=True, check=False)


def _interpreter_reachable(user: User) -> None:
    """Fail (not skip) if other users cannot run the test's interpreter."""
    out = user.run([sys.executable, "-c", "import hmmirror.client"], timeout=USER_DEADLINE)
    if out.returncode != 0:
        pytest.fail(
            f"{sys.executable} cannot run as another user ({out.stderr.strip()[-300:]}); "
            "./hmmirror builds .venv on /usr/bin/python3, which every user can run",
            pytrace=False,
        )


@pytest.fixture
def make_group() -> Iterator[Callable[[], str]]:
    """``make_group()`` creates a throwaway group and returns its name; removed afterwards."""
    made: list[str] = []

    def make() -> str:
        name = f"hmg{secrets.token_hex(4)}"
        subprocess.run(["groupadd", name], check=True, capture_output=True)
        made.append(name)
        return name

    yield make
    for name in made:
        subprocess.run(["groupdel", name], capture_output=True, check=False)


@pytest.fixture
def make_user() -> Iterator[Callable[..., User]]:
    """``make_user(groups=("g",))`` creates a real user with its own group (and optional
    supplementary groups); every user and its processes are removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("attack tests create Unix users: they need root (CI runs as root)")
    made: list[User] = []

    def make(groups: Sequence[str] = ()) -> User:
        name = f"hmu{secrets.token_hex(4)}"
        argv = ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group"]
        if groups:
            argv += ["--groups", ",".join(groups)]
        subprocess.run([*argv, name], check=True, capture_output=True)
        entry = pwd.getpwnam(name)
        user = User(name, entry.pw_uid, entry.pw_gid, tuple(groups))
        made.append(user)
        _interpreter_reachable(user)
        return user

    try:
        yield make
    finally:
        for user in made:
            _remove_user(user)


@pytest.fixture
def hmmd_group(make_group: Callable[[], str]) -> str:
    """The group the test's hmmd gives its socket (the ``hmmd`` fixture reads it): users made
    with ``make_user(groups=(hmmd_group,))`` can connect, as members of ``hmmirror`` can."""
    return make_group()
