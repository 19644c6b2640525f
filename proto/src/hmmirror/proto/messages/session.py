"""Session messages: HELLO and its WELCOME, heartbeats, GOODBYE, and the generic replies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hmmirror.proto.messages.base import Message
from hmmirror.proto.messages.limits import FRAMES_PHYSICAL, MAX_WINDOW, NAME_MAX, U32_MAX
from hmmirror.proto.schema import Kind, wire


@dataclass(frozen=True)
class Hello(Message):
    """Agent → daemon: open a session. Answered by ``welcome``.

    ``agent`` is a human-readable name for logs and ``hmmctl``; ``pid`` the
    agent's process id, for the operator's eyes only. Sending ``hello`` again on
    the same connection opens a fresh session and drops the old one's mirrors.
    """

    TYPE: ClassVar[str] = "hello"
    agent: str = wire(Kind.STR, NAME_MAX)
    pid: int = wire(Kind.UINT, U32_MAX, default=0)


@dataclass(frozen=True)
class Welcome(Message):
    """Daemon → agent, answering ``hello``.

    ``epoch`` is random per daemon start (16 hex digits): a new value means the
    daemon restarted and every translation is void. The agent sends
    ``heartbeat`` every ``heartbeat_ms``; after ``lease_ms`` without one the
    daemon drops the session. An INVALIDATE not acked within ``ack_deadline_ms``
    evicts the mirror. ``frames`` says what the PFN field of this session's
    entries holds: ``"physical"`` (PFNs: a root agent over ipc, or a
    ``frames = "physical"`` grant) or ``"token"`` (opaque frame tokens, equal
    exactly when the pages are). ``zero_pfn`` is the kernel's shared zero page
    in the same terms, its PFN or its token (0 if unknown), so agents can tell
    ZERO pages apart as dmirror does. ``window_max`` (1.1) is the largest
    shared-memory DMA window this session may attach (SPEC §4.9); 0: none (a 1.0
    daemon or agent, a ``tcp://`` session, or windows off).
    """

    TYPE: ClassVar[str] = "welcome"
    session: int = wire(Kind.UINT)
    epoch: str = wire(Kind.STR, 32)
    heartbeat_ms: int = wire(Kind.UINT, U32_MAX)
    lease_ms: int = wire(Kind.UINT, U32_MAX)
    ack_deadline_ms: int = wire(Kind.UINT, U32_MAX)
    zero_pfn: int = wire(Kind.UINT)
    max_fault_pages: int = wire(Kind.UINT, U32_MAX)
    max_dma_pages: int = wire(Kind.UINT, U32_MAX)
    frames: str = wire(Kind.STR, 16, default=FRAMES_PHYSICAL)
    window_max: int = wire(Kind.UINT, MAX_WINDOW, default=0)


@dataclass(frozen=True)
class Heartbeat(Message):
    """Agent → daemon: renew the lease. Answered by ``heartbeat_ack``."""

    TYPE: ClassVar[str] = "heartbeat"


@dataclass(frozen=True)
class HeartbeatAck(Message):
    """Daemon → agent, answering ``heartbeat``; ``epoch`` as in ``welcome``."""

    TYPE: ClassVar[str] = "heartbeat_ack"
    epoch: str = wire(Kind.STR, 32)


@dataclass(frozen=True)
class Goodbye(Message):
    """Agent → daemon: close the session and drop its mirrors. Answered by ``ok``."""

    TYPE: ClassVar[str] = "goodbye"


@dataclass(frozen=True)
class Ok(Message):
    """Daemon → agent: the request named by the header's ``re`` succeeded."""

    TYPE: ClassVar[str] = "ok"


@dataclass(frozen=True)
class Error(Message):
    """Either direction: the request named by the header's ``re`` failed.

    ``code`` is an ``ErrorCode``; ``message`` says what failed, for whom and why.
    ``re`` is 0 when the failing message could not be decoded far enough to name.
    """

    TYPE: ClassVar[str] = "error"
    code: int = wire(Kind.UINT, 65535)
    message: str = wire(Kind.STR, 1024)
