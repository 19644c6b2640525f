"""The client's typed failures: one root, families below (httpx-style).

Device operations fail like dmirror's ioctls: ``DeviceError`` is an
``OSError`` whose ``errno`` is EFAULT, EPERM, EBUSY, EINVAL or ESRCH. A refusal
whose code stands for an errno (``ERRNO_OF_CODE``: ESRCH, EINVAL, TOO_LARGE,
...) is a ``RemoteDeviceError``, both the ``RemoteError`` it is and that
``DeviceError``, the way ``OSError(errno.ENOENT, ...)`` is a
``FileNotFoundError`` (PEP 3151): whoever made it, it carries its errno.
"""

from __future__ import annotations

import errno as _errno
import os

from hmmirror.proto.errors import ERRNO_OF_CODE, ErrorCode


class AgentError(Exception):
    """Root of every hmmirror client failure."""


class DaemonUnavailable(AgentError):
    """hmmd cannot be reached, stopped answering heartbeats, or restarted (new epoch)."""


class RequestTimeout(AgentError, TimeoutError):
    """No reply within the deadline; the request may or may not have taken effect."""


class RemoteError(AgentError):
    """hmmd answered with an error (a ``RemoteDeviceError`` where the code is an errno's)."""

    def __new__(cls, code: int, message: str, *args: object) -> RemoteError:
        """The class the code calls for: RemoteDeviceError for an errno-valued code, Moved
        for MOVED."""
        if cls is RemoteError and _errno_of(code) is not None:
            return RemoteDeviceError.__new__(RemoteDeviceError, code, message)
        if cls is RemoteError and code == ErrorCode.MOVED:
            return super().__new__(Moved, code, message)
        return super().__new__(cls, code, message, *args)

    def __init__(self, code: int, message: str, owner: str = "") -> None:
        try:
            self.code: ErrorCode | int = ErrorCode(code)
        except ValueError:
            self.code = code
        name = self.code.name if isinstance(self.code, ErrorCode) else str(code)
        # Not super(): in a RemoteDeviceError the next class is DeviceError, which sets its own.
        AgentError.__init__(self, f"{name}: {message}")
        self.message = message
        #: With MOVED (SPEC §1.7): the endpoint of the hmmd that watches the process.
        self.owner = owner


class Moved(RemoteError):
    """MOVED: another hmmd of the target's host watches the process; ``owner`` is its
    endpoint (``SessionGroup`` follows it to a member)."""


class SyncIncomplete(AgentError):
    """A strict ``sync_range`` completed, but some mirrors were evicted (or left) instead of
    acking. The range is invalidated all the same: those mirrors hold nothing usable."""


class UnexpectedReply(RemoteError):
    """The peer answered a request with a message of another type than the request's reply
    (code BAD_MESSAGE): a protocol bug on one side, never a refusal."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(ErrorCode.BAD_MESSAGE, f"expected {expected}, got {got}")
        self.expected = expected
        self.got = got


class MirrorEvicted(AgentError):
    """The daemon evicted this mirror (missed ack deadline or lease); register again.

    Not the wire message ``hmmirror.proto.messages.Evicted``, which announces it."""


class DeviceError(AgentError, OSError):
    """A device operation failed with the errno dmirror would return.

    ``str()`` is ``[Errno N] strerror: message``; ``message`` is what was said after it.
    A message that already starts with this errno's ``[Errno N] strerror: `` (a peer
    that sent ``str()`` of its own DeviceError) is not prefixed twice.
    """

    def __init__(self, errno: int, message: str) -> None:
        message = _unprefixed(errno, message)
        OSError.__init__(self, errno, f"{os.strerror(errno)}: {message}")
        self.message = message


class RemoteDeviceError(RemoteError, DeviceError):
    """A refusal whose code stands for an errno: ``code`` and ``message`` as a
    RemoteError, ``errno`` as a DeviceError (``RemoteError(code, ...)`` makes one)."""

    def __new__(cls, code: int, message: str, *args: object) -> RemoteDeviceError:
        """An OSError with the errno of ``code`` (OSError sets it here, in __new__)."""
        errno = _errno_of(code)
        if errno is None:
            raise ValueError(f"error code {code} stands for no errno")
        return OSError.__new__(cls, errno, _strerror(code, errno, message))

    def __init__(self, code: int, message: str, owner: str = "") -> None:
        errno = self.errno
        assert errno is not None  # __new__ set it
        RemoteError.__init__(self, code, _unprefixed(errno, message))
        self.args = (errno, _strerror(code, errno, message))


def _strerror(code: int, errno: int, message: str) -> str:
    """``strerror: message``, naming the wire code where it is not the errno's own name
    (``Invalid argument: TOO_LARGE: ...``)."""
    name = ErrorCode(code).name
    label = "" if name == _errno.errorcode.get(errno) else f"{name}: "
    return f"{os.strerror(errno)}: {label}{_unprefixed(errno, message)}"


def _unprefixed(errno: int, message: str) -> str:
    """``message`` without the ``[Errno N] strerror: `` of ``errno`` that a peer which sent
    ``str()`` of its own DeviceError put in front of it."""
    prefix = f"[Errno {errno}] {os.strerror(errno)}: "
    while message.startswith(prefix):
        message = message[len(prefix) :]
    return message


def _errno_of(code: int) -> int | None:
    """The errno the wire code ``code`` stands for, if any."""
    try:
        return ERRNO_OF_CODE.get(ErrorCode(code))
    except ValueError:
        return None


class RemoteAccessError(DeviceError):
    """An RDMA access named an unknown key, fell outside the MR, or lacks the MR's access
    right: the work completion status ``IBV_WC_REM_ACCESS_ERR`` (errno EACCES)."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EACCES, message)


def device_error(exc: RemoteError) -> AgentError:
    """The device-level failure a peer's error reply stands for.

    REMOTE_ACCESS becomes ``RemoteAccessError``; the errno-valued codes become
    ``DeviceError``; anything else stays the ``RemoteError`` it is.
    """
    if exc.code == ErrorCode.REMOTE_ACCESS:
        return RemoteAccessError(exc.message)
    if isinstance(exc, DeviceError):
        return exc
    mapped = _errno_of(exc.code)
    if mapped is not None:
        return DeviceError(mapped, exc.message)
    return exc
