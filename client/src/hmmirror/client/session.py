"""An agent's session with hmmd: the agent API, and hmmd's INVALIDATE and EVICTED pushes.

The socket is a plain pyzmq DEALER registered with ``loop.add_reader`` and
drained until ``EVENTS`` has no POLLIN (its FD is edge-triggered). INVALIDATE
is handled synchronously inside the drain loop, under the loop's implicit
lock: every item zaps its mirror's entries at once, and the cumulative ACK for
the burst goes out when no DMA of ours still uses a zapped page (``_acks.py``).
HELLO, the lease and recovery are ``Lifecycle``'s (``_lifecycle.py``);
``sync_range`` batching is ``SyncBatcher``'s (``_syncs.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from hmmirror.client._lifecycle import Lifecycle, State
from hmmirror.client._oneshot import ask, inventory, status
from hmmirror.client._syncs import SyncBatcher
from hmmirror.client.curve import CurveKeys
from hmmirror.client.errors import AgentError, DaemonUnavailable
from hmmirror.client.mirror import Mirror
from hmmirror.client.window import DmaWindow
from hmmirror.proto.codec import Envelope, encode_ack
from hmmirror.proto.messages import (
    Access,
    Event,
    Evicted,
    Invalidate,
    Register,
    Registered,
    Status,
    StatusReply,
    Welcome,
    WindowOpen,
    WindowTicket,
)
from hmmirror.transport.door import DoorError, knock_async

# ask, inventory and status are the one-shot helpers (_oneshot.py); callers have always
# imported them from here.
__all__ = ["Session", "State", "ask", "connect", "inventory", "status"]

log = logging.getLogger(__name__)


class Session(Lifecycle):
    """A live session. Create it with ``connect``; it owns its socket and its mirrors.

    It is built as a ``Lifecycle`` is (``Lifecycle.__init__``): what it adds starts
    empty, so it needs no constructor of its own.
    """

    #: INVALIDATE messages received (this class's 0 until the first).
    invalidations_received = 0
    #: The shared-memory DMA window (``use_window``), and the session hmmd attached it for.
    _window: DmaWindow | None = None
    #: The WELCOME of the session hmmd attached the window to (a session id alone could name
    #: another session of a restarted hmmd).
    _window_for: Welcome | None = None
    _window_task: asyncio.Task[bool] | None = None

    @functools.cached_property
    def _syncs(self) -> SyncBatcher:
        """The ``sync_range`` batcher, made on first use."""
        return SyncBatcher(self)

    # --- inbound --------------------------------------------------------------------------------

    def _on_push(self, env: Envelope) -> None:
        """hmmd's own messages: INVALIDATE and EVICTED."""
        msg = env.msg
        if isinstance(msg, Invalidate):
            self._on_invalidate(msg)
            # Ack now: the EVENTS check that follows then also covers the send's edge.
            self._advance_acks()
        elif isinstance(msg, Evicted):
            # The whole session is fenced: every mirror goes, not only the ids listed (the
            # list is capped at 4096).
            self._drop_all(f"evicted: {msg.reason}", evicted=True)
            log.warning("session %s evicted by hmmd: %s", self.name, msg.reason)
            self.loop.call_soon(self._fence)

    def _on_invalidate(self, msg: Invalidate) -> None:
        """Zap the named mirrors' entries; queue the ACK behind the DMA fences."""
        self.invalidations_received += 1
        if msg.mirrors:  # 1.2: item i is for mirrors[i], or for mirror past its end (§4.3)
            per_mirror: dict[int, list[tuple[int, int, int, int]]] = {}
            names = msg.mirrors
            for i, item in enumerate(msg.items):
                per_mirror.setdefault(names[i] if i < len(names) else msg.mirror, []).append(item)
            fences = []
            for mirror_id, items in per_mirror.items():
                mirror = self.mirrors.get(mirror_id)
                if mirror is not None:
                    fences += mirror._invalidate_items(tuple(items))
        else:
            mirror = self.mirrors.get(msg.mirror)
            fences = mirror._invalidate_items(msg.items) if mirror is not None else []
        self._acks.append((msg.n, fences))

    def _advance_acks(self) -> None:
        """ACK the highest n whose zaps are done and whose DMA fences have drained."""
        upto = self._acks.drained()
        if upto > self._acks.acked:
            # The id is taken like any request's, so the next request never reuses it.
            msg_id = self._next_id
            self._next_id += 1
            try:
                self._send_frames(encode_ack(upto, msg_id))
            except DaemonUnavailable:
                return  # not sent: a later ack must still cover it
            self._acks.acked = upto

    def dma_done(self) -> None:
        """A DMA finished: acks waiting on it may go out now."""
        if self._acks:
            self._advance_acks()

    # --- the shared-memory DMA window (SPEC §4.9) ------------------------------------------------

    @property
    def dma_window(self) -> DmaWindow | None:
        """The window hmmd holds for this very session, or None: take the plain path."""
        window, welcome = self._window, self.welcome
        if window is None or welcome is None or self._window_for is not welcome:
            return None
        return window if self.state is State.LIVE else None

    async def use_window(self, size: int) -> bool:
        """Share a DMA window of ``size`` bytes with hmmd (``ipc://`` only) and keep it
        attached across re-HELLOs; say whether hmmd took it now (if not, DMAs take the
        plain path, and the reason is logged)."""
        if self._window is not None or not self.endpoint.startswith("ipc://"):
            return self.dma_window is not None
        self._window = DmaWindow(size)
        return await self._attach_window()

    async def _attach_window(self) -> bool:
        """Ask for a ticket and hand the memfd to hmmd's door with it."""
        window, welcome = self._window, self.welcome
        if window is None or welcome is None:
            return False
        if welcome.window_max < window.size:
            log.info(
                "hmmd at %s offers no DMA window of %d bytes (window_max %d): plain DMA",
                self.endpoint, window.size, welcome.window_max,
            )  # fmt: skip
            return False
        try:
            ticket = await self.call(WindowOpen(size=window.size), WindowTicket)
            line = f"window {ticket.ticket}".encode()
            await knock_async(self.endpoint[len("ipc://") :], line, window.fd, self.timeout)
        except (AgentError, DoorError) as exc:
            log.warning("no DMA window from hmmd at %s: %s; plain DMA", self.endpoint, exc)
            return False
        if self.welcome is not welcome:
            return await self._attach_window()  # a new session meanwhile: attach to it
        self._window_for = welcome
        return True

    def _welcomed(self) -> None:
        """Attach the DMA window to the new session (in the background: until it is, DMAs
        take the plain path)."""
        if self._window is not None and (self._window_task is None or self._window_task.done()):
            self._window_task = asyncio.ensure_future(self._attach_window())

    async def close(self) -> None:
        """End the session (``Lifecycle.close``), then release the DMA window."""
        try:
            await super().close()
        finally:
            if self._window_task is not None:
                self._window_task.cancel()
            if self._window is not None:
                self._window.close()

    # --- the agent API ------------------------------------------------------------------------

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
        """Mirror [start, start + length) of process ``pid``; return the Mirror.

        ``watch_writes`` subscribes to WRITTEN invalidations of the pages the target
        writes (it needs the target's userfaultfd: see ``hmmirror.client.expose``).
        ``strict_writes`` makes such a write wait until this mirror acked the
        invalidation (it needs ``expose(strict=True)`` in the target).
        """
        reg = await self.call(
            Register(
                pid=pid,
                start_time=start_time,
                intervals=((start, start + length),),
                access=int(access),
                watch_writes=watch_writes,
                strict_writes=strict_writes,
            ),
            Registered,
        )
        mirror = Mirror(self, reg, start, length, Access(access))
        self.mirrors[mirror.id] = mirror
        return mirror

    async def sync_range(
        self, pid: int, start: int, end: int, event: Event = Event.CLEAR, *, strict: bool = False
    ) -> None:
        """Invalidate [start, end) of ``pid``; return once every mirror acked or was evicted.

        With ``strict``, a mirror evicted (or gone) instead of acking raises
        ``SyncIncomplete`` once the invalidation is complete. Calls made in the
        same loop tick for the same process, event and strictness travel as one
        ``sync_range`` message, and all of them return (or raise) when it is answered.
        """
        await self._syncs.join(pid, start, end, event, strict)

    async def status(self) -> dict[str, int | float | str]:
        """The daemon's figures (see ``StatusReply``)."""
        return dict((await self.call(Status(), StatusReply)).stats)


@asynccontextmanager
async def connect(
    endpoint: str, *, name: str = "agent", timeout: float = 5.0, curve: CurveKeys | None = None
) -> AsyncIterator[Session]:
    """Open a session with hmmd at ``endpoint`` (``ipc://...`` or ``tcp://...``).

    A ``tcp://`` hmmd wants CURVE: pass ``curve`` (``CurveKeys.load``), or set
    ``$HMMIRROR_SERVER_KEY`` and ``$HMMIRROR_CLIENT_KEY``.
    """
    if curve is None and endpoint.startswith("tcp://"):
        curve = CurveKeys.from_env()
    session = Session(endpoint, name, timeout, curve)
    await session.open()
    try:
        yield session
    finally:
        await session.close()
