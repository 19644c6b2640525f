"""Shared-memory DMA windows (SPEC §4.9): tickets, the door's checks, and the mappings.

A local agent creates a memfd, seals its size, and asks for a ticket with
``window_open``; it then hands the memfd to hmmd's door with the line
``window <ticket>``. hmmd maps it (MAP_SHARED) and from then on copies DMA data
between the target and that mapping, so the data never crosses a socket.

Everything the peer hands in is hostile, so the default is to refuse:

- a ticket is 128 random bits, single use (taken at the first door line that
  names it, whatever follows), expires after ``TICKET_TTL``, and belongs to one
  live session; the door's SO_PEERCRED must be that session's own process (pid,
  uid and start time, and the door's pidfd, where the kernel gives one, must
  still name that pid);
- the descriptor must be a memfd (a regular file with seals: only shmem and
  hugetlbfs files have them, and only a memfd can be sealed against shrinking)
  with F_SEAL_SHRINK, F_SEAL_GROW and F_SEAL_SEAL set, of exactly the size the
  ticket was asked for: it can never shrink under hmmd's mapping (no SIGBUS) nor
  be resized;
- sizes are bounded: ``MAX_WINDOW`` per session, ``MAX_WINDOWS`` and
  ``TOTAL_BYTES`` in all, ``BYTES_PER_UID`` per user; one window per session
  (a second ``window_open`` is refused with EBUSY until the session ends);
- a request names ``[offset, offset + length)`` of the window, checked against
  its size (``Window.view``); hmmd itself never loads or stores through the
  mapping: only ``process_vm_readv``/``writev`` touch it (a fault there is an
  EFAULT, never a signal).

A window ends with its session. A copy still running then keeps a view of the
mapping, so the mapping goes away only once that copy returned (closing an
mmap with a live view raises BufferError: the last reference unmaps it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import logging
import mmap
import os
import secrets
import stat
import time
from dataclasses import dataclass

from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.linux.creds import sender_start_time
from hmmirror.daemon.linux.procfs import PAGE_SIZE
from hmmirror.daemon.state import Session
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import MAX_WINDOW, TICKET_HEX
from hmmirror.proto.version import WINDOW_VERSION
from hmmirror.transport.peer import Peer

log = logging.getLogger(__name__)

#: How long a ticket stays valid after ``window_ticket`` was sent.
TICKET_TTL = 5.0
#: Windows hmmd maps at most, in all; and bytes, in all and per uid of the agents.
MAX_WINDOWS = 64
TOTAL_BYTES = 1 << 30
BYTES_PER_UID = 256 << 20
#: The seals a window's memfd must carry (fcntl's F_SEAL_*; its size can never change).
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW = 0x1, 0x2, 0x4
REQUIRED_SEALS = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW
_F_GET_SEALS = 1034


class Window:
    """hmmd's shared mapping of one session's memfd."""

    def __init__(self, mapping: mmap.mmap, size: int, uid: int) -> None:
        self._map: mmap.mmap | None = mapping
        self.size = size
        self.uid = uid

    def view(self, offset: int, length: int) -> memoryview:
        """Bytes ``[offset, offset + length)`` of the window; EINVAL unless they lie inside."""
        mapping = self._map
        if mapping is None:
            raise RequestError(ErrorCode.EINVAL, "the session's window is closed")
        if length <= 0 or offset < 0 or offset + length > self.size:
            raise RequestError(
                ErrorCode.EINVAL,
                f"window bytes [{offset}, {offset + length}) are outside the window of "
                f"{self.size} bytes",
            )
        return memoryview(mapping)[offset : offset + length]

    def close(self) -> None:
        """Unmap, or, while a copy still holds a view, leave the last view to unmap it."""
        mapping, self._map = self._map, None
        if mapping is not None:
            with contextlib.suppress(BufferError):
                mapping.close()


@dataclass
class _Ticket:
    """What a ticket was issued for: a session, its process, a size, and until when."""

    value: str
    session: Session
    pid: int
    uid: int
    start: int
    size: int
    expires: float


def is_memfd(fd: int) -> str | None:
    """Why ``fd`` is not a memfd sealed against any change of size (None: it is one)."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        return f"cannot stat the descriptor: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return "the descriptor is not a memfd (not a regular file)"
    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError:
        return "the descriptor is not a memfd (it has no seals)"
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        return "the memfd must be sealed with F_SEAL_SHRINK, F_SEAL_GROW and F_SEAL_SEAL"
    return None


def _is_process(peer: Peer, pidfd: int, ticket: _Ticket) -> bool:
    """Whether the door's sender is the ticket's process: its pid, uid and start time, the
    start time read while the door's pidfd of the sender shows it alive (not a reused pid)."""
    if peer.pid != ticket.pid or peer.uid != ticket.uid:
        return False
    try:
        return sender_start_time(peer.pid, pidfd) == ticket.start
    except ProcessLookupError:
        return False


class Windows:
    """Every session's window and pending ticket, bounded."""

    def __init__(self, enabled: bool) -> None:
        #: Windows come through the door of an ``ipc://`` hmmd only.
        self.enabled = enabled
        self._tickets: dict[int, _Ticket] = {}
        self._windows: dict[int, Window] = {}
        self.attached = 0
        self.refused = 0
        #: DMAs served through a window (``dma_read_into``, ``dma_write_from``).
        self.reads = 0
        self.writes = 0

    def of(self, session: Session) -> Window:
        """The session's window; EINVAL if it has none."""
        window = self._windows.get(session.id)
        if window is None:
            raise RequestError(
                ErrorCode.EINVAL, f"session {session.id} has no window (window_open first)"
            )
        return window

    def _room(self, uid: int, size: int) -> str | None:
        """Why a window of ``size`` bytes for ``uid`` does not fit the caps (None: it does)."""
        total = sum(w.size for w in self._windows.values())
        mine = sum(w.size for w in self._windows.values() if w.uid == uid)
        if len(self._windows) >= MAX_WINDOWS or total + size > TOTAL_BYTES:
            return f"hmmd maps {len(self._windows)} windows of {total} bytes already"
        if mine + size > BYTES_PER_UID:
            return f"uid {uid} has windows of {mine} bytes already (cap {BYTES_PER_UID})"
        return None

    def offer(self, session: Session) -> int:
        """``welcome.window_max`` for a new session: ``MAX_WINDOW``, or 0 where it may have
        no window (a tcp:// session, an agent that said hello as 1.0, a tcp:// hmmd)."""
        local = session.peer.pid is not None and session.credentials is not None
        return MAX_WINDOW if self.enabled and local and session.version >= WINDOW_VERSION else 0

    def open(self, session: Session, size: int) -> tuple[str, int]:
        """A new ticket for ``session`` (replacing its pending one): (hex, ttl in ms)."""
        peer, creds = session.peer, session.credentials
        if not self.offer(session) or peer.pid is None or peer.uid is None or creds is None:
            raise RequestError(
                ErrorCode.PERMISSION_DENIED, "windows are for local agents of an ipc:// hmmd only"
            )
        if size < PAGE_SIZE or size % PAGE_SIZE or size > MAX_WINDOW:
            raise RequestError(
                ErrorCode.EINVAL,
                f"window size {size} is not a multiple of {PAGE_SIZE} in [{PAGE_SIZE}, "
                f"{MAX_WINDOW}]",
            )
        if session.id in self._windows:
            raise RequestError(
                ErrorCode.EBUSY, f"session {session.id} has a window already (one per session)"
            )
        why = self._room(peer.uid, size)
        if why is not None:
            raise RequestError(ErrorCode.EBUSY, why)
        self._expire()
        value = secrets.token_hex(TICKET_HEX // 2)
        self._tickets[session.id] = _Ticket(
            value, session, peer.pid, peer.uid, creds.start, size, time.monotonic() + TICKET_TTL
        )
        return value, int(TICKET_TTL * 1000)

    def _expire(self) -> None:
        """Forget the tickets past their time."""
        now = time.monotonic()
        for sid in [sid for sid, t in self._tickets.items() if t.expires <= now]:
            del self._tickets[sid]

    def _take(self, value: str) -> _Ticket | None:
        """The pending ticket ``value``, now used up; None if there is none."""
        found = None
        for ticket in self._tickets.values():
            # compare_digest: the lookup must not tell a guesser how close it came.
            if hmac.compare_digest(ticket.value, value):
                found = ticket
        if found is not None:
            del self._tickets[found.session.id]
        return found

    def on_door(self, peer: Peer, arg: str, fd: int, pidfd: int) -> str | None:
        """Door line ``window <ticket>`` with a memfd: map it as the ticket's session's window.

        Returns None once the window is attached (the descriptor is closed: the mapping
        keeps the memory), or the one-line reason of a refusal (the door closes it).
        """
        why = self._attach(peer, arg, fd, pidfd)
        if why is None:
            self.attached += 1
            with contextlib.suppress(OSError):
                os.close(fd)
            return None
        self.refused += 1
        if self.refused <= 100 or self.refused % 1000 == 0:
            log.warning("refused a window from %s: %s", peer.identity, why)
        return why

    def _attach(self, peer: Peer, arg: str, fd: int, pidfd: int) -> str | None:
        """Check the ticket, the sender and the memfd, then map it; the refusal if any."""
        if fd < 0 or peer.pid is None or peer.uid is None:
            return "a window comes through a local door, with one memfd"
        value = arg.strip()
        if len(value) != TICKET_HEX or any(c not in "0123456789abcdef" for c in value):
            return f"a window ticket is {TICKET_HEX} lowercase hex digits"
        self._expire()
        ticket = self._take(value)
        if ticket is None:
            return "unknown, expired or used window ticket"
        session = ticket.session
        if session.fenced or session.id in self._windows:
            return f"session {session.id} has ended or has a window already"
        if not _is_process(peer, pidfd, ticket):
            return "the ticket belongs to another process's session"
        why = is_memfd(fd)
        if why is not None:
            return why
        size = os.fstat(fd).st_size
        if size != ticket.size:
            return f"the memfd has {size} bytes; the ticket was for {ticket.size}"
        why = self._room(peer.uid, size)
        if why is not None:
            return why
        try:
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            return f"cannot map the memfd: {exc}"
        self._windows[session.id] = Window(mapping, size, peer.uid)
        log.info("session %d attached a DMA window of %d bytes", session.id, size)
        return None

    def end(self, session: Session) -> None:
        """``session`` ended: its ticket is void and its window is unmapped."""
        self._tickets.pop(session.id, None)
        window = self._windows.pop(session.id, None)
        if window is not None:
            window.close()

    def close(self) -> None:
        """hmmd stops: every window goes."""
        self._tickets.clear()
        for window in self._windows.values():
            window.close()
        self._windows.clear()

    def figures(self) -> dict[str, int]:
        """``status`` figures: windows mapped now, their bytes, attached and refused so far."""
        return {
            "windows": len(self._windows),
            "window_bytes": sum(w.size for w in self._windows.values()),
            "windows_attached": self.attached,
            "window_refusals": self.refused,
            "window_reads": self.reads,
            "window_writes": self.writes,
        }
