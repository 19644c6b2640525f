"""The target's own sync call: announce a change to every mirror before making it.

The kernel runs the invalidate callbacks before it changes a page table; a
watcher in user space only sees a change after it happened. A cooperating
process can restore the kernel's order by announcing the change first:

>>> async with hmmirror.client.target.connect(endpoint) as me:
...     async with me.invalidating(addr, addr + length, Event.UNMAP):
...         libc.munmap(addr, length)          # every mirror has acked by now

and, without asyncio:

>>> me = BlockingAnnouncer(endpoint)
>>> with me.invalidating(addr, addr + length, Event.CLEAR):
...     libc.madvise(addr, length, MADV_DONTNEED)

``expose()`` hands hmmd a userfaultfd of this process, so that munmap,
madvise, mremap and fork reach the mirrors as they happen rather than one
watcher poll later.

On a host with several hmmds (SPEC.md §1.7), give every endpoint, as a list or
comma-separated as in ``HMMIRROR_ENDPOINT``: the process speaks to its pid's pick
among them (``pid % N``, as ``connect_group`` picks) and, when another one watches
it, to the one a ``MOVED`` refusal names, never to an endpoint it was not given.

This is ``sync_cpu_device_pagetables`` made literal. ``invalidating`` enters its
body only once every mirror covering the range has acked. A mirror evicted
instead (dead, stopped or partitioned past its deadline) makes it raise
``SyncIncomplete`` after that deadline rather than hang; the range is
invalidated all the same, so the caller may still go ahead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import zmq
from hmmirror.client.errors import (
    DaemonUnavailable,
    Moved,
    RemoteError,
    RequestTimeout,
    SyncIncomplete,
)
from hmmirror.client.group import SessionGroup, connect_group, matching, pick
from hmmirror.client.session import Session
from hmmirror.client.session import connect as _connect
from hmmirror.proto.codec import decode, encode
from hmmirror.proto.errors import ErrorCode, ProtocolError
from hmmirror.proto.messages import Error, Event, Hello, Message, SyncRange, Welcome
from hmmirror.transport import DoorError, dial
from hmmirror.transport.intake import OfferMoved, intake_path, offer
from hmmirror.transport.sockets import context

#: How long a blocking call waits for hmmd: longer than any ack deadline hmmd would use.
DEFAULT_TIMEOUT = 15.0
#: The hmmd a target speaks to when neither its caller nor ``HMMIRROR_ENDPOINT`` names one.
DEFAULT_ENDPOINT = "ipc:///run/hmmirror/hmmd.sock"


#: What names the hmmds a target speaks to: one endpoint, several comma-separated, or a list.
Endpoints = str | Sequence[str]


def endpoints_of(endpoint: Endpoints | None) -> list[str]:
    """The hmmd endpoints ``endpoint`` names (``$HMMIRROR_ENDPOINT`` when None, else the
    default socket), in order; ValueError if it names none or one twice."""
    if endpoint is None or endpoint == "":
        endpoint = os.environ.get("HMMIRROR_ENDPOINT") or DEFAULT_ENDPOINT
    parts = endpoint.split(",") if isinstance(endpoint, str) else list(endpoint)
    named = [part.strip() for part in parts]
    if not named or not all(named) or len(set(named)) != len(named):
        raise ValueError(f"hmmd endpoints must be distinct and not empty, got {endpoint!r}")
    return named


def _pick(endpoints: Sequence[str]) -> int:
    """This process's pick among ``endpoints``: the one ``SessionGroup`` picks for its pid."""
    return pick(os.getpid(), len(endpoints))


def _moved_to(endpoints: Sequence[str], owner: str, tried: set[int]) -> int | None:
    """The index of the member ``owner`` names, if it was not tried yet; else None."""
    at = matching(owner, endpoints)
    return None if at is None or at in tried else at


class Announcer:
    """This process announcing its own changes to the mirrors before it makes them (asyncio).

    Not a target someone else watches: the announcer *is* the target, speaking for itself.
    With several hmmds, ``session`` is their ``SessionGroup``, which follows ``MOVED``.
    """

    def __init__(self, session: Session | SessionGroup) -> None:
        self.session = session
        self.pid = os.getpid()

    @asynccontextmanager
    async def invalidating(
        self, start: int, end: int, event: Event = Event.CLEAR
    ) -> AsyncIterator[None]:
        """Enter once every mirror of [start, end) of this process has acked the invalidation.

        Raises SyncIncomplete if a mirror was evicted instead of acking.
        """
        await self.session.sync_range(self.pid, start, end, event, strict=True)
        yield


@asynccontextmanager
async def connect(
    endpoint: Endpoints, *, timeout: float = DEFAULT_TIMEOUT
) -> AsyncIterator[Announcer]:
    """A session with hmmd for this process's own announcements (a ``SessionGroup`` when
    ``endpoint`` names several)."""
    endpoints, name = endpoints_of(endpoint), f"target-{os.getpid()}"
    if len(endpoints) == 1:
        async with _connect(endpoints[0], name=name, timeout=timeout) as session:
            yield Announcer(session)
        return
    async with connect_group(endpoints, name=name, timeout=timeout) as group:
        yield Announcer(group)


class _Gone(DaemonUnavailable):
    """Our socket refused a request at once: hmmd closed the connection (nothing was sent)."""


class BlockingAnnouncer:
    """The blocking twin of ``Announcer``: a plain socket, no event loop, no heartbeats.

    The session is opened on first use and again whenever hmmd has dropped it
    (a lease that lapsed between calls, or a daemon restart); a connection hmmd
    closed (it drops one that stays silent, SPEC §1.0) is found at the next send,
    which our socket refuses at once (no peer), and replaced by a new knock.
    """

    def __init__(self, endpoint: Endpoints, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        #: Every hmmd this process may speak to; ``endpoint`` is the one it speaks to now.
        self.endpoints = endpoints_of(endpoint)
        self._at = _pick(self.endpoints)
        self.endpoint = self.endpoints[self._at]
        self.timeout = timeout
        self.pid = os.getpid()
        self._ctx = context()
        try:
            self._sock = self._dial()
        except DaemonUnavailable:
            self._ctx.term()
            raise
        self._next_id = 1
        self._open = False

    def _dial(self) -> zmq.Socket[Any]:
        """A new connection to hmmd (a knock at its door)."""
        try:
            return dial(self._ctx, self.endpoint, timeout=self.timeout)
        except (DoorError, OSError, ValueError) as exc:
            raise DaemonUnavailable(f"cannot connect to hmmd at {self.endpoint}: {exc}") from exc

    def _redial(self) -> None:
        """hmmd closed our connection: knock again; the session must be opened anew."""
        self._sock.close(linger=0)
        self._open = False
        self._sock = self._dial()

    def _move(self, at: int) -> None:
        """Speak to ``endpoints[at]`` from now on (the hmmd that watches this process)."""
        self._at, self.endpoint = at, self.endpoints[at]
        self._redial()

    def close(self) -> None:
        """Close the socket."""
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> BlockingAnnouncer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, msg: Message) -> Message:
        """One request and its reply, within ``timeout``; raise RequestTimeout or RemoteError."""
        msg_id = self._next_id
        self._next_id += 1
        try:
            # Never a blocking send: with no peer (hmmd closed the connection) it would wait
            # for good. The refusal leaves nothing queued; the caller knocks again.
            self._sock.send_multipart(encode(msg, msg_id), zmq.NOBLOCK)
        except zmq.Again as exc:
            raise _Gone(f"hmmd at {self.endpoint} closed the connection") from exc
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                raise RequestTimeout(
                    f"no reply to {msg.TYPE} from hmmd at {self.endpoint} in {self.timeout:g} s"
                )
            frames: list[Any] = self._sock.recv_multipart(copy=False)
            try:
                env = decode(frames)
            except ProtocolError:
                continue  # not for us (or garbage): keep waiting for our reply
            if env.re != msg_id:
                continue  # an unsolicited message or a stale reply
            if isinstance(env.msg, Error):
                raise RemoteError(env.msg.code, env.msg.message, env.msg.owner)
            return env.msg

    def _hello(self) -> None:
        """Open (or reopen) the session."""
        reply = self._call(Hello(agent=f"target-{self.pid}", pid=self.pid))
        if not isinstance(reply, Welcome):
            raise DaemonUnavailable(f"hmmd at {self.endpoint} answered hello with {reply.TYPE}")
        self._open = True

    def sync_range(self, start: int, end: int, event: Event = Event.CLEAR) -> None:
        """Invalidate [start, end) of this process; return once every mirror acked.

        Raises SyncIncomplete (some mirror was evicted instead), RequestTimeout,
        or RemoteError.
        """
        if not 0 <= start < end <= 1 << 64:
            raise ValueError(f"sync_range [{start:#x}, {end:#x}) is empty or out of range")
        msg = SyncRange(pid=self.pid, ranges=((start, end),), event=int(event), strict=True)
        retried, tried = False, {self._at}
        while True:
            try:
                if not self._open:
                    self._hello()
                self._call(msg)
                return
            except _Gone:
                if retried:
                    raise
                retried = True
                self._redial()  # nothing was sent: knock, hello and ask again, once
            except Moved as exc:
                # Another of our hmmds watches this process: ask it, each member once.
                at = _moved_to(self.endpoints, exc.owner, tried)
                if at is None:
                    raise
                tried.add(at)
                self._move(at)
            except RemoteError as exc:
                if exc.code == ErrorCode.INCOMPLETE:
                    raise SyncIncomplete(exc.message) from exc
                if exc.code in (ErrorCode.NO_SESSION, ErrorCode.FENCED) and not retried:
                    retried = True
                    self._open = False  # the lease lapsed between calls: hello again, once
                    continue
                raise

    @contextlib.contextmanager
    def invalidating(self, start: int, end: int, event: Event = Event.CLEAR) -> Iterator[None]:
        """Enter once every mirror of [start, end) of this process has acked the invalidation."""
        self.sync_range(start, end, event)
        yield


_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
_UFFD_USER_MODE_ONLY = 1


def expose_path(endpoint: Endpoints | None = None) -> str:
    """Where hmmd takes userfaultfds: ``$HMMIRROR_EXPOSE_SOCKET``, else the intake of hmmd at
    ``endpoint`` (or ``$HMMIRROR_ENDPOINT``; of several, this process's pick): an ``ipc://``
    endpoint's own socket, for ``tcp://`` hmmd.uffd.sock in the runtime directory
    (``transport.intake.intake_path``)."""
    explicit = os.environ.get("HMMIRROR_EXPOSE_SOCKET")
    if explicit:
        return explicit
    endpoints = endpoints_of(endpoint)
    return intake_path(endpoints[_pick(endpoints)])


def expose(
    endpoint: Endpoints | None = None, *, strict: bool = False, timeout: float = 5.0
) -> None:
    """Give hmmd a userfaultfd of this process, so its changes are seen as they happen.

    Creates the fd (user-mode-only where unprivileged userfaultfd is off), offers
    it at hmmd's uffd intake (SPEC.md §1.6), and closes this process's copy: hmmd
    configures and owns it. ``endpoint`` is hmmd's ``ipc://`` endpoint (or
    ``$HMMIRROR_ENDPOINT``); of several, the offer goes to this process's pick, then
    to the one that watches the process if the pick refuses it naming that one.
    ``$HMMIRROR_EXPOSE_SOCKET`` names the intake directly. Call it again with
    ``strict=True`` to allow strict-write mirrors, which need a second userfaultfd
    (synchronous write-protection). Raises OSError (or DaemonUnavailable when hmmd
    refuses it).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    nr = _SYS_USERFAULTFD.get(platform.machine())
    if nr is None:
        raise OSError(38, f"userfaultfd is unknown on {platform.machine()}")
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    fd = int(libc.syscall(nr, flags))
    if fd < 0:  # vm.unprivileged_userfaultfd = 0: user-mode faults are enough for hmmd
        fd = int(libc.syscall(nr, flags | _UFFD_USER_MODE_ONLY))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd: {os.strerror(err)}")
    try:
        _offer(endpoint, fd, strict, timeout)
    except DoorError as exc:
        raise DaemonUnavailable(f"hmmd did not take this process's userfaultfd: {exc}") from exc
    finally:
        os.close(fd)


def _offer(endpoint: Endpoints | None, fd: int, strict: bool, timeout: float) -> None:
    """Offer ``fd`` at the pick's intake, then at the intake of the member a refusal names
    as the process's owner (each member once); raise the last DoorError."""
    if os.environ.get("HMMIRROR_EXPOSE_SOCKET"):
        offer(expose_path(endpoint), fd, strict=strict, timeout=timeout)
        return
    endpoints = endpoints_of(endpoint)
    at = _pick(endpoints)
    tried = {at}
    while True:
        try:
            offer(intake_path(endpoints[at]), fd, strict=strict, timeout=timeout)
            return
        except OfferMoved as exc:
            moved = _moved_to(endpoints, exc.owner, tried)
            if moved is None:
                raise
            at = moved
            tried.add(at)
