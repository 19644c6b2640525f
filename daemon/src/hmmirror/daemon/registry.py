"""The registry: every session, watched mm and mirror of one hmmd, and their ids.

Sessions are found by the routing id of their connection, mms by (pid, start
time), mirrors by id. Dropping a mirror drops its mm once nothing uses it;
dropping an mm closes what watches it (its tasks and userfaultfds, kept on the
``Mm``), its pidfd and its view, exactly once. Nothing here sends a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.state import Mirror, Mm, Session
from hmmirror.proto.errors import ErrorCode


class Registry:
    """hmmd's sessions, mms and mirrors."""

    def __init__(self, on_close: Callable[[Mm], None]) -> None:
        self.sessions: dict[bytes, Session] = {}
        self.mms: dict[tuple[int, int], Mm] = {}
        self.mirrors: dict[int, Mirror] = {}
        #: Called once for an mm being closed (the copier forgets its worker).
        self.on_close = on_close
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

    def add_mirror(self, mirror: Mirror) -> None:
        """Make ``mirror`` known to its mm, its session and by id."""
        mirror.mm.mirrors.append(mirror)
        mirror.session.mirrors[mirror.id] = mirror
        self.mirrors[mirror.id] = mirror

    def drop_mirror(self, mirror: Mirror) -> None:
        """Forget ``mirror``; forget its mm too once nothing uses it."""
        mirror.dead = True
        mirror.session.mirrors.pop(mirror.id, None)
        self.mirrors.pop(mirror.id, None)
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

    def close(self) -> None:
        """Shutdown: close every mm."""
        for mm in list(self.mms.values()):
            self.drop_mm(mm)
