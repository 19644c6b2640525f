"""userfaultfd from the monitor's side: configure another process's uffd, read its events.

Every ioctl here acts on the uffd's own mm, not the caller's, so hmmd can do
``UFFDIO_API`` and ``UFFDIO_REGISTER`` for a target whose fd it holds
(docs/ARCHITECTURE.md §A.1). Debian's headers predate several of these
values, so they are defined here from include/uapi/linux/userfaultfd.h.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(platform.machine(), -1)
SYS_PIDFD_GETFD = 438
UFFD_USER_MODE_ONLY = 1
UFFD_API = 0xAA


def _iowr(nr: int, size: int) -> int:
    """``_IOWR(0xAA, nr, size)``."""
    return (3 << 30) | (size << 16) | (0xAA << 8) | nr


UFFDIO_API = _iowr(0x3F, 24)
UFFDIO_REGISTER = _iowr(0x00, 32)
UFFDIO_UNREGISTER = (2 << 30) | (16 << 16) | (0xAA << 8) | 0x01  # _IOR
UFFDIO_WRITEPROTECT = _iowr(0x06, 24)
WRITEPROTECT_MODE_WP = 1 << 0
WRITEPROTECT_MODE_DONTWAKE = 1 << 1
PAGEFAULT_FLAG_WP = 1 << 1

FEATURE_EVENT_FORK = 1 << 1
FEATURE_EVENT_REMAP = 1 << 2
FEATURE_EVENT_REMOVE = 1 << 3
FEATURE_EVENT_UNMAP = 1 << 6
FEATURE_WP_UNPOPULATED = 1 << 13
FEATURE_WP_ASYNC = 1 << 15
#: What hmmd asks for: the non-cooperative events, and asynchronous write-protection.
WATCH_FEATURES = (
    FEATURE_EVENT_FORK | FEATURE_EVENT_REMAP | FEATURE_EVENT_REMOVE | FEATURE_EVENT_UNMAP
    | FEATURE_WP_UNPOPULATED | FEATURE_WP_ASYNC
)  # fmt: skip
#: Strict mode's uffd: the events, and write-protection whose faults wait for hmmd.
STRICT_FEATURES = (
    FEATURE_EVENT_FORK | FEATURE_EVENT_REMAP | FEATURE_EVENT_REMOVE | FEATURE_EVENT_UNMAP
    | FEATURE_WP_UNPOPULATED
)  # fmt: skip
REGISTER_MODE_WP = 1 << 1

EVENT_PAGEFAULT = 0x12
EVENT_FORK = 0x13
EVENT_REMAP = 0x14
EVENT_REMOVE = 0x15
EVENT_UNMAP = 0x16
_MSG = struct.Struct("B7x3Q")
#: Events read per ``read`` call (each ``struct uffd_msg`` is 32 bytes).
_BATCH = 64


def userfaultfd(user_mode_only: bool = False) -> int:
    """A new userfaultfd of the calling process (O_CLOEXEC | O_NONBLOCK)."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK | (UFFD_USER_MODE_ONLY if user_mode_only else 0)
    fd = int(_libc.syscall(SYS_USERFAULTFD, flags))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd: {os.strerror(err)}")
    return fd


def getfd(pidfd: int, targetfd: int) -> int:
    """``pidfd_getfd``: a duplicate of the target's fd ``targetfd`` in this process, which
    must be a userfaultfd: another thread of the target may have put any file at that
    number since it was looked at (an ioctl on one of the user's FUSE files would wait on
    the user's server). Raises OSError (EBADF: not a userfaultfd)."""
    fd = int(_libc.syscall(SYS_PIDFD_GETFD, pidfd, targetfd, 0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd({targetfd}): {os.strerror(err)}")
    os.set_inheritable(fd, False)
    if not is_userfaultfd(fd):
        os.close(fd)
        raise OSError(errno.EBADF, f"fd {targetfd} of the target is no longer a userfaultfd")
    return fd


def is_userfaultfd(fd: int) -> bool:
    """Whether ``fd`` (one of ours) is a userfaultfd (its link names the file's kind
    without touching the file)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    except OSError:
        return False


def api(fd: int, features: int) -> int:
    """``UFFDIO_API``; returns the features the kernel granted. EINVAL if already done."""
    arg = bytearray(struct.pack("3Q", UFFD_API, features, 0))
    fcntl.ioctl(fd, UFFDIO_API, arg, True)
    return int(struct.unpack_from("3Q", arg)[1])


def features_of(fd: int) -> int:
    """The features a uffd of ours was configured with (0: ``UFFDIO_API`` never ran)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("API:"):
                return int(line.split()[1].split(":")[1], 16)
    return 0


def ensure_api(fd: int, features: int) -> None:
    """``UFFDIO_API`` unless already done with at least ``features`` (a FORK child's uffd
    inherits its parent's); raise OSError(EINVAL) if it was set up otherwise."""
    try:
        api(fd, features)
    except OSError as exc:
        if exc.errno != errno.EINVAL or features_of(fd) & features != features:
            raise


def register(fd: int, start: int, length: int, mode: int = REGISTER_MODE_WP) -> None:
    """``UFFDIO_REGISTER`` [start, start + length) of the uffd's mm (EINVAL on file VMAs)."""
    fcntl.ioctl(fd, UFFDIO_REGISTER, bytearray(struct.pack("4Q", start, length, mode, 0)), True)


def unregister(fd: int, start: int, length: int) -> None:
    """``UFFDIO_UNREGISTER`` [start, start + length)."""
    fcntl.ioctl(fd, UFFDIO_UNREGISTER, bytearray(struct.pack("2Q", start, length)), True)


def writeprotect(fd: int, start: int, length: int, protect: bool, wake: bool = True) -> None:
    """``UFFDIO_WRITEPROTECT``: protect, or lift the protection (waking blocked writers)."""
    mode = (WRITEPROTECT_MODE_WP if protect else 0) | (0 if wake else WRITEPROTECT_MODE_DONTWAKE)
    fcntl.ioctl(fd, UFFDIO_WRITEPROTECT, bytearray(struct.pack("3Q", start, length, mode)), True)


def read_events(fd: int) -> list[tuple[int, int, int, int]]:
    """Every queued event as (event, arg0, arg1, arg2), without blocking.

    Reading an event is what lets the target thread that raised it go on.
    """
    out: list[tuple[int, int, int, int]] = []
    while True:
        try:
            data = os.read(fd, _MSG.size * _BATCH)
        except BlockingIOError:
            return out
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return out
            raise
        if not data:
            return out
        out.extend(_MSG.unpack_from(data, off) for off in range(0, len(data), _MSG.size))
        if len(data) < _MSG.size * _BATCH:
            return out


def held(pid: int) -> dict[int, dict[str, str]] | None:
    """The userfaultfds in ``pid``'s fd table: fd -> its fdinfo fields; None if the table
    cannot be read. Nothing here touches the files themselves (a descriptor swapped for a
    FUSE file meanwhile could make a ``stat`` wait on its server)."""
    found: dict[int, dict[str, str]] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:[userfaultfd]":
                continue
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                info = f.read()
        except OSError:
            continue
        fields = (line.split(":", 1) for line in info.splitlines() if ":" in line)
        found[int(name)] = {key: value.strip() for key, value in fields}
    return found


def unconfigured_uffds(pid: int) -> list[int]:
    """The target's userfaultfds on which nobody has done ``UFFDIO_API`` yet.

    Those are the ones a cooperating target left for hmmd; a uffd the target
    configured itself is its own business and is never touched.
    """
    found = []
    for fd, info in (held(pid) or {}).items():
        # "API:\t<api>:<features>:<ioctls>"; features 0 means UFFDIO_API never ran.
        parts = info.get("API", "").split(":")
        with contextlib.suppress(ValueError):
            if len(parts) >= 2 and int(parts[1], 16) == 0:
                found.append(fd)
    return sorted(found)
