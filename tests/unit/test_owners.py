"""``Owners``: claims on processes shared by a host's hmmds, through real files and flocks.

Two ``Owners`` over one directory stand for two instances: each holds its claims
through its own open file descriptions, so the kernel arbitrates between them as it
does between processes. A writer that died is a real process that exited.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator

import pytest
from hmmirror.daemon import owners as owners_module
from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.owners import Moved, Owners, OwnersError, OwnersMissing
from hmmirror.proto.errors import ErrorCode

A = "ipc:///run/hmmirror/hmmd-0.sock"
B = "ipc:///run/hmmirror/hmmd-1.sock"
KEY = (4242, 777)
NAME = "4242-777"


@pytest.fixture
def directory(tmp_path: os.PathLike[str]) -> str:
    return os.path.join(os.fspath(tmp_path), "owners")


@pytest.fixture
def pair(directory: str) -> Iterator[tuple[Owners, Owners]]:
    a, b = Owners(directory, A), Owners(directory, B)
    yield a, b
    a.close()
    b.close()


def dead_writer() -> str:
    """A claim's text as a writer that has since exited wrote it."""
    child = subprocess.Popen(["true"])
    child.wait()
    return f"{A}\n{child.pid} 12345\n"


def test_the_second_claimer_is_moved_to_the_first(pair: tuple[Owners, Owners]) -> None:
    a, b = pair
    a.hold(*KEY)
    with pytest.raises(Moved) as moved:
        b.hold(*KEY)
    assert moved.value.owner == A and moved.value.code == ErrorCode.MOVED
    assert b.owner_of(*KEY) == A and a.owner_of(*KEY) is None
    assert len(a) == 1 and len(b) == 0


def test_claims_are_counted_and_the_last_drop_frees_the_process(
    pair: tuple[Owners, Owners], directory: str
) -> None:
    a, b = pair
    a.hold(*KEY)
    a.hold(*KEY)  # the mm and a kept uffd offer of the same process
    a.drop(*KEY)
    with pytest.raises(Moved):
        b.hold(*KEY)
    a.drop(*KEY)
    assert os.listdir(directory) == []
    assert b.owner_of(*KEY) is None
    b.hold(*KEY)
    assert a.owner_of(*KEY) == B


def test_a_claim_unlinked_between_open_and_lock_is_tried_again(
    pair: tuple[Owners, Owners], directory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claimer opened the old file just before its owner gave it up (unlinked it and
    unlocked it): it gets the lock on a file no name leads to, and must not stop there."""
    a, b = pair
    a.hold(*KEY)
    real_flock = fcntl.flock
    calls = []

    def owner_leaves_first(fd: int, operation: int) -> None:
        if not calls:
            a.drop(*KEY)  # between b's open and b's lock
        calls.append(fd)
        real_flock(fd, operation)

    monkeypatch.setattr(owners_module.fcntl, "flock", owner_leaves_first)
    b.hold(*KEY)
    assert len(calls) == 2  # locked the unlinked file, saw it, opened the name again
    assert os.listdir(directory) == [NAME]
    assert a.owner_of(*KEY) == B


def test_a_claim_left_by_a_dead_owner_is_taken_over(directory: str) -> None:
    os.makedirs(directory, mode=0o700)
    with open(os.path.join(directory, NAME), "w") as left:
        left.write(dead_writer())
    b = Owners(directory, B)
    try:
        assert b.owner_of(*KEY) is None  # its writer is gone: nobody's
        b.hold(*KEY)
        with open(os.path.join(directory, NAME)) as claim:
            assert claim.read().startswith(f"{B}\n{os.getpid()} ")
    finally:
        b.close()


def test_a_claim_locked_but_not_yet_written_is_busy_not_moved(directory: str) -> None:
    """Between an owner's lock and its write a claimer sees an old writer (or none): it is
    told to ask again, never sent to whoever wrote there last."""
    os.makedirs(directory, mode=0o700)
    fd = os.open(os.path.join(directory, NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, dead_writer().encode())
        fcntl.flock(fd, fcntl.LOCK_EX)
        b = Owners(directory, B)
        try:
            with pytest.raises(RequestError) as busy:
                b.hold(*KEY)
            assert busy.value.code == ErrorCode.EBUSY and not isinstance(busy.value, Moved)
        finally:
            b.close()
    finally:
        os.close(fd)


def test_sweep_removes_claims_nobody_holds_and_keeps_the_held(directory: str) -> None:
    a = Owners(directory, A)
    try:
        a.hold(*KEY)
        with open(os.path.join(directory, "99-1"), "w") as left:
            left.write(dead_writer())
        b = Owners(directory, B)
        try:
            assert b.sweep() == 1
            assert os.listdir(directory) == [NAME]
        finally:
            b.close()
    finally:
        a.close()
    assert os.listdir(directory) == []  # close gives every claim back


def test_the_directory_is_made_private(directory: str) -> None:
    Owners(directory, A).close()
    assert os.stat(directory).st_mode & 0o777 == 0o700


@pytest.mark.parametrize("mode", [0o770, 0o705, 0o777])
def test_a_directory_others_could_write_or_read_is_refused(directory: str, mode: int) -> None:
    os.makedirs(directory)
    os.chmod(directory, mode)
    with pytest.raises(OwnersError, match=f"mode 0700 \\(it has uid {os.geteuid()}, mode"):
        Owners(directory, A)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_directory_of_another_user_is_refused(directory: str) -> None:
    os.makedirs(directory, mode=0o700)
    os.chown(directory, 65534, 65534)
    with pytest.raises(OwnersError, match="it has uid 65534"):
        Owners(directory, A)


@pytest.mark.parametrize("what", ["a symbolic link to a directory", "a file"])
def test_something_else_at_the_name_is_refused_not_taken_for_missing(
    directory: str, tmp_path: os.PathLike[str], what: str
) -> None:
    """Whoever put it there meant it: hmmd refuses to start, where a directory that merely
    cannot be made (``OwnersMissing``) leaves a default one claiming nothing."""
    if what == "a file":
        open(directory, "w").close()
    else:
        elsewhere = os.path.join(os.fspath(tmp_path), "elsewhere")
        os.makedirs(elsewhere, mode=0o700)
        os.symlink(elsewhere, directory)
    with pytest.raises(OwnersError, match="owners directory") as refused:
        Owners(directory, A)
    assert type(refused.value) is OwnersError


def test_a_directory_that_cannot_be_made_is_missing(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(OwnersMissing):
        Owners(os.path.join("/proc", "hmmirror-none", "owners"), A)


def test_a_claim_of_its_own_left_behind_names_nobody_to_it(
    pair: tuple[Owners, Owners], directory: str
) -> None:
    """A claim file that names this instance but is not held by it (given back, and left
    behind) must not make it answer MOVED naming itself: it names nobody, and is taken over."""
    a, b = pair
    a.hold(*KEY)
    with open(os.path.join(directory, NAME), "rb") as claim:
        signature = claim.read()
    a.drop(*KEY)
    with open(os.path.join(directory, NAME), "wb") as left:
        left.write(signature)  # as if the unlink had failed
    assert a.owner_of(*KEY) is None
    a.hold(*KEY)
    with pytest.raises(Moved):
        b.hold(*KEY)
