"""The client's typed failures: one root, families below (httpx-style).

Device operations fail like dmirror's ioctls: ``DeviceError`` is an
``OSError`` whose ``errno`` is EFAULT, EPERM, EBUSY, EINVAL or ESRCH.
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
    """hmmd answered with an error."""

    def __init__(self, code: int, message: str) -> None:
        try:
            self.code: ErrorCode | int = ErrorCode(code)
        except ValueError:
            self.code = code
        name = self.code.name if isinstance(self.code, ErrorCode) else str(code)
        super().__init__(f"{name}: {message}")
        self.message = message


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
    """A device operation failed with the errno dmirror would return."""

    def __init__(self, errno: int, message: str) -> None:
        OSError.__init__(self, errno, f"{os.strerror(errno)}: {message}")


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
    mapped = ERRNO_OF_CODE.get(exc.code) if isinstance(exc.code, ErrorCode) else None
    if mapped is not None:
        return DeviceError(mapped, exc.message)
    return exc
