"""What a request handler is given: the request (``Request``) and hmmd's services (``Services``).

A handler takes both and answers inline, or returns an awaitable for work that
must wait (a fault that populates, a strict ``sync_range``); a ``RequestError``
it raises becomes a typed error reply. ``Services`` is the narrow view of hmmd a
handler may use, declared here, below the handlers, so that they never import
the daemon; ``dispatch.Dispatcher`` provides it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Protocol

from hmmirror.daemon import authz
from hmmirror.daemon.dma.copier import Copier
from hmmirror.daemon.dma.service import DmaService
from hmmirror.daemon.dma.window import Windows
from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.frames import FrameTokens
from hmmirror.daemon.invalidation import Invalidator
from hmmirror.daemon.linux.creds import Creds
from hmmirror.daemon.linux.procfs import PAGE_SHIFT, PAGE_SIZE
from hmmirror.daemon.registry import Registry
from hmmirror.daemon.state import Mm, Session, UffdWatcher
from hmmirror.proto.codec import Envelope
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import USER_ADDR_END, Message
from hmmirror.transport.budget import ReplyBudget
from hmmirror.transport.peer import Peer


class Request(NamedTuple):
    """One decoded request, with who sent it (a tuple: made once per inbound message, it
    costs a third of a frozen dataclass)."""

    identity: bytes
    """The routing id of the connection it came on (where the reply goes)."""
    session: Session | None
    """The connection's session (None before HELLO; it may be fenced)."""
    env: Envelope
    """The decoded message, its header id and type, and its bulk frames."""
    peer: Peer
    """Who sent it, as the transport proved it."""
    vouched: Creds | None
    """What was read about a local agent's process when it connected (its credentials)."""


class Services(authz.DaemonView, Protocol):
    """What the handlers use of hmmd: the registry and the services, and the calls that
    answer, reserve reply room, and start or stop watching."""

    epoch: str
    zero_pfn: int
    registry: Registry
    budget: ReplyBudget
    copier: Copier
    dma: DmaService
    frames: FrameTokens
    invalidator: Invalidator
    windows: Windows

    def send(
        self,
        identity: bytes,
        msg: Message,
        re: int = 0,
        bulk: Sequence[Any] = (),
        copy: bool = True,
        reserved: int = 0,
    ) -> None:
        """Send a reply or message to ``identity`` (through its session's outbox)."""

    def reserve(self, identity: bytes, nbytes: int, what: str) -> int:
        """Set aside reply room for a bulk reply; EBUSY past the cap."""
        ...

    def reject(
        self, identity: bytes, code: ErrorCode, message: str, re: int, mtype: str, bad: bool
    ) -> None:
        """Answer a request with an error."""

    def answer_failure(self, identity: bytes, env: Envelope, exc: Exception) -> None:
        """Answer a handler's failure."""

    def close_session(self, session: Session) -> None:
        """Forget ``session``."""

    def attach_mm(self, pid: int, wanted_start: int) -> Mm:
        """The watched Mm of ``pid``."""
        ...

    def cover_with_uffd(self, mm: Mm) -> None:
        """Register ``mm``'s mirrored VMAs with its uffds."""

    def track_writes(self, mm: Mm) -> None:
        """Arm written-page tracking for ``mm``."""

    def strict_watch(self, mm: Mm) -> UffdWatcher | None:
        """``mm``'s strict-write watch, if it can have one."""
        ...

    def device_write(self, mm: Mm, start: int, end: int) -> AbstractContextManager[None]:
        """Around hmmd's own write into the target."""
        ...


Handler = Callable[[Services, Request], "Awaitable[None] | None"]


def whole_pages(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` widened to whole pages: a change to part of a page is a change to the page
    (the kernel's notifier ranges always cover whole pages), so a ``sync_range`` that names
    part of one must invalidate all of it. Each end stays within ``USER_ADDR_END`` (no mirror
    lies beyond), and every range keeps at least a page."""
    out = []
    for start, end in ranges:
        lo = start & ~(PAGE_SIZE - 1)
        hi = min((end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1), USER_ADDR_END)
        out.append((lo, max(hi, lo + PAGE_SIZE)))
    return out


def aligned_range(start: int, npages: int, what: str) -> int:
    """Check a page-aligned, non-empty range inside user space; return its end."""
    if start % PAGE_SIZE:
        raise RequestError(ErrorCode.EINVAL, f"{what} start {start:#x} is not page-aligned")
    if npages == 0:
        raise RequestError(ErrorCode.EINVAL, f"{what} of zero pages")
    end = start + (npages << PAGE_SHIFT)
    if end > USER_ADDR_END:
        raise RequestError(ErrorCode.EINVAL, f"{what} [{start:#x}, {end:#x}) leaves user space")
    return end
