"""The directory of claims the host's hmmds share cannot be turned off by another user.

An hmmd that cannot make its default owners directory runs claiming nothing (and says so).
A directory another user made first, unreadable to hmmd's user, was taken for one that
could not be made: that instance then claimed nothing while its peers did, and two hmmds
could watch the same process (a ``sync_range`` at one left the other's mirrors stale).
hmmd runs here as a real non-root user; the directory is a second user's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

#: As hmmd's user: open the owners directory argv[1]; say how it went.
OPEN_OWNERS = r"""
import sys
from hmmirror.daemon.owners import Owners, OwnersError, OwnersMissing
try:
    Owners(sys.argv[1], "ipc:///tmp/nowhere.sock")
except OwnersMissing as exc:
    print("missing", exc)
except OwnersError as exc:
    print("refused", exc)
else:
    print("taken")
"""


@pytest.fixture
def shared() -> Iterator[str]:
    """A sticky directory every user may write, as /tmp is; removed afterwards."""
    directory = tempfile.mkdtemp(prefix="hmown-", dir="/tmp")
    os.chmod(directory, 0o1777)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_another_users_unreadable_directory_is_refused_not_taken_for_missing(
    make_user: Callable[..., Any], shared: str
) -> None:
    attacker, service = make_user(), make_user()
    planted = os.path.join(shared, "hmmd-owners")
    made = attacker.run(["mkdir", "-m", "700", planted])
    assert made.returncode == 0, made.stderr
    out = service.run(service.python(OPEN_OWNERS, planted))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused"), out.stdout
    # A directory that merely cannot be made (the service may not write its parent) is
    # still missing, not refused: that hmmd runs, claiming nothing, and says so.
    os.chmod(shared, 0o755)
    out = service.run(service.python(OPEN_OWNERS, os.path.join(shared, "not-made")))
    assert out.stdout.startswith("missing"), out.stdout
