"""Typed errors of the wire layer, and the error codes that travel on the wire.

Wire errors are data (``ErrorCode`` plus a message), never tracebacks. The
errno-valued codes use Linux's numbers so that a client can raise an
``OSError`` whose ``errno`` is what the kernel's dmirror device would return.
"""

from __future__ import annotations

import errno
from enum import IntEnum


class ErrorCode(IntEnum):
    """Error codes carried by the ``error`` message."""

    EPERM = errno.EPERM
    """A write through a mapping the target may not write."""
    ESRCH = errno.ESRCH
    """The target process does not exist (or is not the one registered)."""
    EFAULT = errno.EFAULT
    """No VMA, or an unreadable one, covers the range."""
    EAGAIN = errno.EAGAIN
    """The connection holds its reply cap of unread replies: read them, then ask again."""
    EBUSY = errno.EBUSY
    """Invalidations kept racing the request past its retry budget, or a copy into or out of
    the target did not finish within the copy deadline."""
    EINVAL = errno.EINVAL
    """Bad arguments: unaligned, empty, wrapping or outside the mirror."""
    STALE = 100
    """A DMA named a translation that no longer matches the live page table."""
    PERMISSION_DENIED = 101
    """Policy does not allow this agent to do that to that process."""
    BAD_MESSAGE = 102
    """The message failed decoding or validation."""
    UNKNOWN_MESSAGE = 103
    """The message type is not one the receiver accepts."""
    VERSION_MISMATCH = 104
    """The protocol major version differs."""
    NO_SESSION = 105
    """The request needs a session; send ``hello`` first."""
    FENCED = 106
    """The session was fenced after an eviction; send ``hello`` again."""
    TOO_LARGE = 107
    """The request exceeds a size cap."""
    NO_MIRROR = 108
    """No such mirror in this session."""
    REMOTE_ACCESS = 109
    """An RDMA request named an unknown rkey, fell outside the MR, or lacks the MR's access
    right (``IBV_WC_REM_ACCESS_ERR``)."""
    INCOMPLETE = 110
    """A strict ``sync_range`` completed, but some mirrors were evicted (or left) instead of
    acking; they hold no usable translation any more."""
    MOVED = 111
    """Another hmmd of this host watches the process; ``error.owner`` names its endpoint
    (protocol 1.3, SPEC §1.7)."""
    INTERNAL = 199
    """The receiver failed; the request may or may not have taken effect."""


#: The one errno map: the errno each wire code stands for where a device operation fails
#: like a dmirror ioctl. The errno-valued codes stand for themselves; TOO_LARGE is EINVAL
#: (the ioctl's answer to an oversize range) and REMOTE_ACCESS is EACCES (a work completion's
#: ``IBV_WC_REM_ACCESS_ERR``).
ERRNO_OF_CODE: dict[ErrorCode, int] = {
    **{code: int(code) for code in ErrorCode if code < 100},
    ErrorCode.TOO_LARGE: errno.EINVAL,
    ErrorCode.REMOTE_ACCESS: errno.EACCES,
}
#: The other way round, for the errnos that travel as themselves (an ``OSError`` a service
#: answers with): EPERM, ESRCH, EFAULT, EAGAIN, EBUSY and EINVAL.
CODE_OF_ERRNO: dict[int, ErrorCode] = {
    number: code for code, number in ERRNO_OF_CODE.items() if int(code) == number
}


class ProtocolError(Exception):
    """Root of every wire-layer failure: the bytes could not become a message.

    ``id`` is the failing message's header ``id`` once the header was read
    whole (0 before that), so the receiver can answer in ``re`` and the
    sender's pending request fails at once instead of timing out.
    """

    code: ErrorCode = ErrorCode.BAD_MESSAGE
    id: int = 0


class DecodeError(ProtocolError):
    """The frames are malformed: wrong count, not msgpack, wrong field types or sizes."""


class AuthError(ProtocolError):
    """The peer is not authenticated or not allowed."""

    code = ErrorCode.PERMISSION_DENIED


class VersionError(ProtocolError):
    """The header names a protocol major version we do not speak."""

    code = ErrorCode.VERSION_MISMATCH


class UnknownMessage(ProtocolError):
    """The header names a message type that does not exist."""

    code = ErrorCode.UNKNOWN_MESSAGE


class TooLarge(DecodeError):
    """A frame, list or range exceeds a size cap."""

    code = ErrorCode.TOO_LARGE
