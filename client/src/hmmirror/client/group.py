"""Sessions with several hmmd instances of one host, each process's requests sent to its owner.

A host may run several hmmds, each watching its own share of the processes (SPEC.md §1.7).
A ``SessionGroup`` holds one session with each and sends ``mirror`` and ``sync_range`` for
a process to the instance that watches it: first the one its pid picks, then, if that one
answers ``MOVED``, the member the answer names, remembered for the pid's later requests. A
``MOVED`` naming no member of the group is raised (``Moved``, with ``owner``): the group
never connects to an endpoint it was not given.

An hmmd that does not answer when the group opens blocks nobody: the group opens with the
others (``absent`` lists it; at least one must answer), whose picks then cover every pid.
A process it watched is free once it is gone (its claims go with it), and a live member
takes it. One it still watches, alive but unreached, is named by the others' ``MOVED``: the
group then tries it again, once per such answer, within the group's timeout.

>>> endpoints = ["ipc:///run/hmmirror/hmmd-0.sock", "ipc:///run/hmmirror/hmmd-1.sock"]
>>> async with connect_group(endpoints) as group:
...     mirror = await group.mirror(pid, start, length)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

from hmmirror.client.curve import CurveKeys
from hmmirror.client.errors import DaemonUnavailable, Moved
from hmmirror.client.mirror import Mirror
from hmmirror.client.session import Session
from hmmirror.proto.messages import Access, Event

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Processes whose owner the group remembers; past it, it starts again from the pids' picks.
MAX_REMEMBERED = 65536
#: Hosts that mean "every address": an owner bound there is matched by port alone.
WILDCARD_HOSTS = ("0.0.0.0", "*", "[::]")


class SessionGroup:
    """One session per hmmd of a host; requests for a process go to the one watching it."""

    def __init__(
        self,
        sessions: Sequence[Session],
        absent: Sequence[str] = (),
        opener: Callable[[str], Awaitable[Session]] | None = None,
    ) -> None:
        if not sessions:
            raise ValueError("a session group needs at least one session")
        self.sessions = list(sessions)
        #: The group's endpoints with no session: tried again (``opener``) when named.
        self.absent = list(absent)
        self._opener = opener
        #: Called with each session opened after the group was (an absent member that
        #: answered since), before it serves a request: hm-agent attaches its DMA window.
        self.on_join: Callable[[Session], Awaitable[None]] | None = None
        #: Set when the group is closed (``connect_group``'s exit).
        self.closed = False
        self._owner: dict[int, Session] = {}
        #: MOVED answers followed to another member.
        self.moves = 0

    def session_for(self, pid: int) -> Session:
        """The session that serves ``pid``'s requests: its known owner, or its pick."""
        return self._owner.get(pid) or self.sessions[pick(pid, len(self.sessions))]

    async def mirror(
        self,
        pid: int,
        start: int,
        length: int,
        access: Access = Access.READ,
        *,
        start_time: int = 0,
        watch_writes: bool = False,
        strict_writes: bool = False,
    ) -> Mirror:
        """``Session.mirror`` at the hmmd that watches ``pid`` (or comes to)."""
        return await self._at_owner(pid, lambda session: session.mirror(
            pid, start, length, access, start_time=start_time,
            watch_writes=watch_writes, strict_writes=strict_writes,
        ))  # fmt: skip

    async def sync_range(
        self, pid: int, start: int, end: int, event: Event = Event.CLEAR, *, strict: bool = False
    ) -> None:
        """``Session.sync_range`` at the hmmd that watches ``pid``."""
        await self._at_owner(
            pid, lambda session: session.sync_range(pid, start, end, event, strict=strict)
        )

    async def _at_owner(self, pid: int, ask: Callable[[Session], Awaitable[T]]) -> T:
        """``ask`` the member that serves ``pid``, following MOVED to the member it names
        (remembered); each member is asked once at most (``_follow``), so it ends."""
        session, asked = self.session_for(pid), set[int]()
        while True:
            try:
                answer = await ask(session)
            except Moved as exc:
                session = await self._follow(pid, session, asked, exc)
                continue
            self._remember(pid, session)
            return answer

    def member(self, endpoint: str) -> Session | None:
        """The member session at ``endpoint`` (an owner bound to a wildcard address is
        matched by scheme and port), or None."""
        at = matching(endpoint, [session.endpoint for session in self.sessions])
        return None if at is None else self.sessions[at]

    async def _follow(self, pid: int, answered: Session, asked: set[int], exc: Moved) -> Session:
        """The member ``exc`` names as ``pid``'s owner, opened now if it was absent; raise
        ``exc`` if the group has none, or it was asked already (``asked``: the ids of the
        members asked so far), and DaemonUnavailable if it is absent and still unreached."""
        asked.add(id(answered))
        owner = self.member(exc.owner)
        if owner is None:
            owner = await self._join(exc.owner, pid)
        if owner is None or id(owner) in asked:
            raise exc
        self.moves += 1
        self._remember(pid, owner)
        return owner

    async def _join(self, endpoint: str, pid: int) -> Session | None:
        """Open the absent member at ``endpoint``, which watches ``pid``: the new session,
        or None if ``endpoint`` is not the group's; DaemonUnavailable if it does not answer
        (it stays absent)."""
        at = matching(endpoint, self.absent)
        if at is None or self._opener is None:
            return None
        where = self.absent[at]
        try:
            session = await self._opener(where)
        except DaemonUnavailable as exc:
            raise DaemonUnavailable(f"hmmd at {where} watches pid {pid}: {exc}") from exc
        if self.closed:  # closed while it was being opened: nobody would close it
            await session.close()
            raise DaemonUnavailable(f"the group of hmmd at {where} was closed")
        if where in self.absent:  # (a concurrent request may have opened it meanwhile)
            self.absent.remove(where)
            self.sessions.append(session)
            log.info("hmmd at %s answers now: a member of the group again", where)
            if self.on_join is not None:
                await self.on_join(session)
            return session
        await session.close()
        return self.member(where)

    def _remember(self, pid: int, session: Session) -> None:
        """Keep ``session`` as ``pid``'s owner (bounded: forget all past MAX_REMEMBERED)."""
        if len(self._owner) >= MAX_REMEMBERED:
            self._owner.clear()
        self._owner[pid] = session


def pick(pid: int, members: int) -> int:
    """The index of the member a process's requests go to first, of ``members`` (SPEC.md
    §1.7's reference rule: the pid modulo their number); targets pick the same way."""
    return pid % members


def matching(endpoint: str, candidates: Sequence[str]) -> int | None:
    """The index of ``endpoint`` among ``candidates`` (an owner bound to a wildcard address
    is matched by scheme and port), or None."""
    if endpoint in candidates:
        return candidates.index(endpoint)
    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or host not in WILDCARD_HOSTS:
        return None
    for at, candidate in enumerate(candidates):
        if candidate.startswith("tcp://") and candidate.endswith(f":{port}"):
            return at
    return None


@asynccontextmanager
async def connect_group(
    endpoints: Sequence[str],
    *,
    name: str = "agent",
    timeout: float = 5.0,
    curve: CurveKeys | None = None,
) -> AsyncIterator[SessionGroup]:
    """Open a session with each hmmd at ``endpoints`` (as ``connect``), all at once; close
    them all after. One that does not answer is left ``absent`` (said once in the log) as
    long as another does; DaemonUnavailable if none does. Any other refusal is raised."""
    if not endpoints:
        raise ValueError("connect_group needs at least one endpoint")

    async def opener(endpoint: str) -> Session:
        keys = curve
        if keys is None and endpoint.startswith("tcp://"):
            keys = CurveKeys.from_env()
        session = Session(endpoint, name, timeout, keys)
        await session.open()  # closes the session if it fails
        return session

    results = await _open_all(endpoints, opener)
    opened = [r for r in results if isinstance(r, Session)]
    group: SessionGroup | None = None
    try:
        failed = [r for r in results if isinstance(r, BaseException)]
        for exc in failed:
            if not isinstance(exc, DaemonUnavailable) or not opened:
                raise exc
        absent = [e for e, r in zip(endpoints, results, strict=True) if not isinstance(r, Session)]
        for exc in failed:
            log.warning("%s; its processes go to the other hmmds, and it is tried again when "
                        "one of them names it", exc)  # fmt: skip
        group = SessionGroup(opened, absent, opener)
        yield group
    finally:
        if group is not None:
            group.closed = True  # a member that answers from now on is closed at once
        for session in group.sessions if group is not None else opened:
            with contextlib.suppress(Exception):
                await session.close()


async def _open_all(
    endpoints: Sequence[str], opener: Callable[[str], Awaitable[Session]]
) -> list[Session | BaseException]:
    """``opener`` on every endpoint at once: each one's session, or what it raised. If the
    caller is cancelled meanwhile, the sessions that opened are closed before it goes on."""
    tasks = [asyncio.ensure_future(opener(endpoint)) for endpoint in endpoints]
    try:
        await asyncio.wait(tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is None:
                with contextlib.suppress(Exception):
                    await task.result().close()
        raise
    return [task.exception() or task.result() for task in tasks]
