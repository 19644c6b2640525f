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


#: The longest heartbeat, lease or ack deadline an agent accepts in a WELCOME (1 hour).
MAX_TERM_MS = 3_600_000


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

    def unusable(self) -> str | None:
        """Why an agent cannot keep a session on these terms (SPEC §3), or None: a zero or
        a lease shorter than the heartbeat would make it lose the session at once and knock
        again without pause; a heartbeat or lease past ``MAX_TERM_MS`` would leave a silent
        daemon unnoticed for days; a zero page count would refuse every fault or DMA."""
        if not 1 <= self.heartbeat_ms <= MAX_TERM_MS:
            return f"heartbeat_ms {self.heartbeat_ms} (1 to {MAX_TERM_MS})"
        if not self.heartbeat_ms <= self.lease_ms <= MAX_TERM_MS:
            return f"lease_ms {self.lease_ms} ({self.heartbeat_ms} to {MAX_TERM_MS})"
        if not 1 <= self.ack_deadline_ms <= MAX_TERM_MS:
            return f"ack_deadline_ms {self.ack_deadline_ms} (1 to {MAX_TERM_MS})"
        if self.max_fault_pages < 1 or self.max_dma_pages < 1:
            return f"max_fault_pages {self.max_fault_pages}, max_dma_pages {self.max_dma_pages}"
        return None


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
    ``owner`` (1.3) comes with ``MOVED``: the endpoint of the hmmd that watches the process.
    """

    TYPE: ClassVar[str] = "error"
    code: int = wire(Kind.UINT, 65535)
    message: str = wire(Kind.STR, 1024)
    owner: str = wire(Kind.STR, 256, default="", omit_default=True)
