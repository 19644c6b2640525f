"""The registry: every session, watched mm and mirror of one hmmd, their ids, and its claims.

Sessions are found by the routing id of their connection, mms by (pid, start
time), mirrors by id. Dropping a mirror drops its mm once nothing uses it;
dropping an mm closes what watches it (its tasks and userfaultfds, kept on the
``Mm``), its pidfd and its view, and gives back its claim (``owners``), exactly
once. Nothing here sends a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import Callable

from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.limits import MirrorCaps
from hmmirror.daemon.owners import Owners
from hmmirror.daemon.state import Mirror, Mm, Session
from hmmirror.proto.errors import ErrorCode
from hmmirror.transport.peer import Peer


class Registry:
    """hmmd's sessions, mms and mirrors."""

    def __init__(self, on_close: Callable[[Mm], None], caps: MirrorCaps) -> None:
        self.sessions: dict[bytes, Session] = {}
        self.mms: dict[tuple[int, int], Mm] = {}
        self.mirrors: dict[int, Mirror] = {}
        #: The mirrors hmmd keeps at most (``room_for``).
        self.caps = caps
        #: Mirrors and their pages by peer (``Peer.identity``); root's are not counted.
        self._peer_mirrors: Counter[str] = Counter()
        self._peer_pages: Counter[str] = Counter()
        #: Called once for an mm being closed (the copier forgets its worker).
        self.on_close = on_close
        #: This instance's claims on processes among the host's hmmds (``owners``); set
        #: once serving, None with ``owners_dir = "off"``.
        self.owners: Owners | None = None
        self._next_session = 1
        self._next_mirror = 1

    def new_session_id(self) -> int:
        """A session id never used in this epoch."""
        self._next_session += 1
        return self._next_session - 1

    def new_mirror_id(self) -> int:
        """A mirror id never used in this epoch."""
        self._next_mirror += 1
        return self._next_mirror - 1

    def add_session(self, session: Session) -> None:
        """Make ``session`` the session of its connection (replacing any earlier one)."""
        self.sessions[session.identity] = session

    def mirror_of(self, session: Session, mirror_id: int) -> Mirror:
        """The live mirror ``mirror_id`` of ``session``, or NO_MIRROR."""
        mirror = session.mirrors.get(mirror_id)
        if mirror is None or mirror.dead:
            raise RequestError(
                ErrorCode.NO_MIRROR, f"session {session.id} has no mirror {mirror_id}"
            )
        if mirror.mm.released:
            raise RequestError(
                ErrorCode.ESRCH, f"process {mirror.mm.pid} of mirror {mirror_id} exited"
            )
        return mirror

    def room_for(self, peer: Peer, pages: int) -> str | None:
        """Why ``peer`` may not have one more mirror of ``pages`` pages (its caps and hmmd's,
        ``limits.MirrorCaps``), or None. Checked before the mirror's arrays exist."""
        caps = self.caps
        if len(self.mirrors) >= caps.total:
            return f"hmmd keeps {len(self.mirrors)} mirrors, its most (max_mirrors)"
        if peer.root:
            return None
        who = peer.identity
        if self._peer_mirrors[who] >= caps.per_peer:
            return f"{who} holds {caps.per_peer} mirrors, its most (max_mirrors_per_peer)"
        if self._peer_pages[who] + pages > caps.pages_per_peer:
            return (
                f"{who} mirrors {self._peer_pages[who]} pages; {pages} more would pass its "
                f"{caps.pages_per_peer} (max_mirror_pages_per_peer)"
            )
        return None

    def add_mirror(self, mirror: Mirror) -> None:
        """Make ``mirror`` known to its mm, its session and by id."""
        mirror.mm.mirrors.append(mirror)
        mirror.session.mirrors[mirror.id] = mirror
        self.mirrors[mirror.id] = mirror
        peer = mirror.session.peer
        if not peer.root:
            self._peer_mirrors[peer.identity] += 1
            self._peer_pages[peer.identity] += mirror.pages

    def drop_mirror(self, mirror: Mirror) -> None:
        """Forget ``mirror``; forget its mm too once nothing uses it."""
        mirror.dead = True
        mirror.session.mirrors.pop(mirror.id, None)
        peer = mirror.session.peer
        if self.mirrors.pop(mirror.id, None) is not None and not peer.root:
            self._peer_mirrors.subtract({peer.identity: 1})
            self._peer_pages.subtract({peer.identity: mirror.pages})
            if self._peer_mirrors[peer.identity] <= 0:
                del self._peer_mirrors[peer.identity], self._peer_pages[peer.identity]
        mm = mirror.mm
        if mirror in mm.mirrors:
            mm.mirrors.remove(mirror)
        if not mm.mirrors and not mm.released and mm.active == 0:
            self.drop_mm(mm)

    def on_mm_idle(self, mm: Mm) -> None:
        """An mm's windows all closed: forget it if its last mirror went meanwhile."""
        if not mm.mirrors and not mm.released:
            self.drop_mm(mm)

    def drop_mm(self, mm: Mm) -> None:
        """Stop watching ``mm`` and close its pidfd and view, once."""
        if mm.closed:
            return  # never close a pidfd number twice: it may belong to someone else by now
        mm.closed = True
        if self.mms.get(mm.key) is mm:
            del self.mms[mm.key]
        self.on_close(mm)
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(mm.pidfd)
        if mm.watcher is not None:
            mm.watcher.cancel()
        if mm.written is not None:
            mm.written.cancel()
        for watch in (mm.uffd, mm.strict_uffd):
            if watch is not None:
                watch.close()
        with contextlib.suppress(OSError):
            os.close(mm.pidfd)
        mm.view.close()
        if self.owners is not None:  # last: another hmmd may take it over only once unwatched
            self.owners.drop(mm.pid, mm.start_time)

    def close(self) -> None:
        """Shutdown: close every mm."""
        for mm in list(self.mms.values()):
            self.drop_mm(mm)
