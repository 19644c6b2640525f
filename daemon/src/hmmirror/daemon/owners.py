"""Which hmmd of this host watches each process: one owner per mm, arbitrated by the kernel.

Several hmmd instances may run on one host, each on its own endpoint, so that the
processes they watch are spread over several event loops and cores (SPEC.md §1.7).
Two of them must never watch the same process: a ``sync_range`` at one would return
while the other's mirrors still held their translations, and the second's userfaultfd
registration fails (EBUSY), leaving it the slower proc watcher. So an instance *owns*
process (pid, start time) while it holds an exclusive ``flock`` on the file
``<pid>-<start time>`` in the owners directory, with its endpoint written inside. The
kernel drops the lock when the owner closes the file or dies, so a crash frees every
claim; a file left behind is taken over by the next claimer.

A claim is counted: the mm and a kept userfaultfd offer of the same process each hold
one, and the file is unlinked (under the lock) and closed when the last goes. A
claimer that opened the file just before its owner unlinked it finds, once it has
the lock, that the name no longer leads to that file, and tries again.

The directory is hmmd's own (mode 0700, its user): nobody else can plant or remove
a claim, and instances that share it must run as the same user.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os

from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.linux.procfs import start_time
from hmmirror.proto.errors import ErrorCode

#: Directory name of the claims, next to the intake socket (``intake_path``).
OWNERS_DIRNAME = "hmmd-owners"
#: The most bytes of an owner's endpoint that are read back (the wire carries 256).
MAX_OWNER = 256
#: Why a directory may simply not be there to be made: no parent, no permission, read-only.
_MISSING = frozenset((errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS))
#: Tries at a claim whose file its last owner unlinks meanwhile.
CLAIM_TRIES = 3


class OwnersError(Exception):
    """The owners directory cannot be used (a configuration or deployment fault)."""


class OwnersMissing(OwnersError):
    """The owners directory does not exist and cannot be made (no permission, no parent)."""


class Moved(RequestError):
    """Process ``pid`` is watched by the hmmd at ``owner``, another instance of this host."""

    def __init__(self, pid: int, owner: str) -> None:
        super().__init__(
            ErrorCode.MOVED, f"process {pid} is watched by another hmmd of this host, at {owner}"
        )
        self.owner = owner


class Owners:
    """This instance's claims on processes, in a directory shared by the host's hmmds."""

    def __init__(self, directory: str, endpoint: str) -> None:
        self.directory = directory
        self.endpoint = endpoint
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            self._dir = os.open(directory, flags)
        except OSError as exc:
            # Something at the name that cannot be opened (a symbolic link, a file, another
            # user's directory this hmmd may not read) is somebody's doing, never a directory
            # that merely cannot be made: refused like one others could write. Taken for
            # missing, it would leave this instance claiming nothing beside others that do.
            missing = exc.errno in _MISSING and not os.path.lexists(directory)
            kind = OwnersMissing if missing else OwnersError
            raise kind(f"owners directory {directory}: {exc.strerror}") from exc
        st = os.fstat(self._dir)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            os.close(self._dir)
            raise OwnersError(
                f"owners directory {directory} must belong to uid {os.geteuid()} with mode "
                f"0700 (it has uid {st.st_uid}, mode {st.st_mode & 0o777:04o})"
            )
        #: What a claim says: the endpoint, and who wrote it (so that a reader can tell a live
        #: owner from one that died, or has not yet written).
        self._signature = f"{endpoint}\n{os.getpid()} {start_time(os.getpid())}\n".encode()
        #: (pid, start time) -> [descriptor holding the lock, claims counted on it].
        self._held: dict[tuple[int, int], list[int]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, pid: int, start: int) -> None:
        """Claim (pid, start), or count one more claim on it; raise ``Moved`` (or EBUSY while
        the other owner is still writing its endpoint) if another instance owns it."""
        held = self._held.get((pid, start))
        if held is not None:
            held[1] += 1
            return
        try:
            fd = self._claim(pid, start)
        except OSError as exc:  # out of descriptors or space: the request fails, never hmmd
            raise RequestError(
                ErrorCode.EBUSY, f"cannot claim process {pid}: {exc.strerror}"
            ) from exc
        self._held[(pid, start)] = [fd, 1]

    def _claim(self, pid: int, start: int) -> int:
        """The locked claim file of (pid, start), written; ``Moved`` or EBUSY if another
        instance holds it."""
        name = f"{pid}-{start}"
        for _ in range(CLAIM_TRIES):
            fd = os.open(
                name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self._dir
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise _taken(pid, owner) from None
            except BaseException:
                os.close(fd)
                raise
            if self._still_named(fd, name):
                break
            os.close(fd)  # its last owner unlinked it between our open and our lock
        else:
            raise RequestError(ErrorCode.EBUSY, f"process {pid} keeps changing owner; ask again")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._signature, 0)
        except OSError:
            os.close(fd)
            raise
        return fd

    def drop(self, pid: int, start: int) -> None:
        """Give back one claim on (pid, start); the last one unlinks the file and unlocks it."""
        held = self._held.get((pid, start))
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            self._give_back(pid, start)

    def _give_back(self, pid: int, start: int) -> None:
        """Release the claim on (pid, start), however many hold it: truncated, unlinked
        while still locked, closed."""
        fd, _ = self._held.pop((pid, start))
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # a reader that opened it before the unlink sees no owner
        with contextlib.suppress(OSError):
            os.unlink(f"{pid}-{start}", dir_fd=self._dir)  # unlinked while still locked
        with contextlib.suppress(OSError):
            os.close(fd)

    def owner_of(self, pid: int, start: int) -> str | None:
        """The endpoint of the other live instance that owns (pid, start), or None if none
        does (it is this one's, or nobody's). It takes no lock, so it never makes a
        concurrent claimer fail: the claim names its writer, which must be alive."""
        if (pid, start) in self._held:
            return None
        try:
            fd = os.open(
                f"{pid}-{start}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir
            )
        except FileNotFoundError:
            return None
        try:
            owner = _read_owner(fd)
        finally:
            os.close(fd)
        # One of ours that is no longer held (a claim this instance gave back, left behind)
        # names nobody: sending a peer here would make this instance answer MOVED to itself.
        return owner if owner and owner != self.endpoint else None

    def sweep(self) -> int:
        """Remove the claims nobody holds (left by instances that died); return how many."""
        removed = 0
        for name in os.listdir(self._dir):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir)
            except OSError:
                continue
            # A claim held by a live instance refuses the lock; one gone meanwhile, the unlink.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if self._still_named(fd, name):
                    os.unlink(name, dir_fd=self._dir)
                    removed += 1
            os.close(fd)
        return removed

    def close(self) -> None:
        """Give back every claim (shutdown) and close the directory."""
        for pid, start in list(self._held):
            self._give_back(pid, start)
        with contextlib.suppress(OSError):
            os.close(self._dir)

    def _still_named(self, fd: int, name: str) -> bool:
        """Whether ``name`` in the directory is still the file open as ``fd``."""
        try:
            linked = os.stat(name, dir_fd=self._dir, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (linked.st_dev, linked.st_ino) == (mine.st_dev, mine.st_ino)


def _read_owner(fd: int) -> str:
    """The endpoint a live owner wrote in its claim; "" if none is written yet, or its
    writer is gone (it died holding the claim, or a new owner has yet to write)."""
    try:
        endpoint, writer, _ = os.pread(fd, MAX_OWNER + 64, 0).decode("ascii").split("\n")
        pid, start = (int(word) for word in writer.split(" "))
        alive = start_time(pid) == start
    except (OSError, ValueError, UnicodeDecodeError):
        return ""
    wellformed = endpoint.startswith(("ipc://", "tcp://")) and len(endpoint) <= MAX_OWNER
    return endpoint if alive and wellformed else ""


def _taken(pid: int, owner: str) -> RequestError:
    """The refusal for a process another instance owns (EBUSY until it wrote who it is)."""
    if owner:
        return Moved(pid, owner)
    return RequestError(
        ErrorCode.EBUSY, f"another hmmd of this host is starting to watch process {pid}; ask again"
    )
