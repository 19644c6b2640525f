"""Session lifetimes: eviction, closing, and the sweep of expired leases and stalled readers.

A session ends by GOODBYE or a new HELLO (``close``), or by eviction: its lease
expired, it missed an ACK deadline, its connection became unreachable, or it
left its queued replies unread past the deadline (``evict``). Either way its
outstanding INVALIDATE items are forgiven (nobody waits on them) and its
mirrors dropped; an evicted session is also told, best effort, and fenced
until it says HELLO again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from hmmirror.daemon.invalidation import Invalidation, Invalidator
from hmmirror.daemon.outbox import Courier
from hmmirror.daemon.registry import Registry
from hmmirror.daemon.state import Session
from hmmirror.daemon.trace import tracer
from hmmirror.transport import Connection

log = logging.getLogger(__name__)

#: A local connection with no session and no message for this long (at least) is dropped.
IDLE_CONNECTION = 10.0


class Connections(Protocol):
    """The connections the sweep looks after (``transport.Server`` is it)."""

    def idle(self, since: float) -> list[Connection]:
        """The connections with no message since ``since`` (monotonic)."""
        ...

    def drop(self, rid: bytes) -> None:
        """Disconnect ``rid``: what is queued for it goes with the connection."""


class Sessions:
    """Ends sessions: eviction, closing, and the periodic sweep."""

    def __init__(
        self,
        registry: Registry,
        invalidator: Invalidator,
        courier: Courier[Invalidation],
        connections: Connections,
        counters: dict[str, int],
        on_end: Callable[[Session], None] = lambda session: None,
    ) -> None:
        self.registry = registry
        #: Called once a session ends, evicted or closed (its DMA window is unmapped).
        self.on_end = on_end
        self.invalidator = invalidator
        self.courier = courier
        self.connections = connections
        self.counters = counters

    def evict(self, session: Session, reason: str) -> None:
        """Fence ``session``: drop its mirrors, forgive its acks, tell it (best effort)."""
        if session.fenced:
            return
        session.fenced = True
        self.counters["evictions"] += 1
        if tracer.on:
            tracer.evicted(session, reason)
        ids = tuple(session.mirrors)
        log.warning("evicting session %d (%s): %s", session.id, session.name, reason)
        self.invalidator.forgive(session)
        for mirror in list(session.mirrors.values()):
            self.registry.drop_mirror(mirror)
        self.on_end(session)
        self.courier.evicted(session, ids, reason)

    def close(self, session: Session) -> None:
        """Forget ``session`` (GOODBYE or a new HELLO), forgiving acks, dropping mirrors."""
        self.invalidator.forgive(session)
        for mirror in list(session.mirrors.values()):
            self.registry.drop_mirror(mirror)
        self.on_end(session)
        self.registry.sessions.pop(session.identity, None)

    async def sweep(
        self, lease: float, ack_deadline: float, period: float, also: Callable[[], None]
    ) -> None:
        """Each ``period``: evict and forget the sessions past their ``lease``, and those that
        left their queued replies unread past the ack deadline; drop the local connections
        silent as long; then run ``also`` (userfaultfd offers that expired are closed)."""
        sessions = self.registry.sessions
        silence = max(IDLE_CONNECTION, 4 * (lease + ack_deadline))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for session in list(sessions.values()):
                if now - session.last_seen > lease:
                    if not session.fenced:
                        self.evict(session, f"no heartbeat for {lease:g} s (lease expired)")
                    sessions.pop(session.identity, None)
            for conn in self.connections.idle(now - silence):
                # A local client silent that long, with no session, has gone (or will dial
                # again): its descriptors come back. A request never waits that long.
                # (A tcp connection cannot be closed from here: its record stays, bounded.)
                if conn.endpoint and conn.rid not in sessions:
                    self.connections.drop(conn.rid)
            also()
            self._evict_stalled()

    def _evict_stalled(self) -> None:
        """Evict the sessions whose connection stayed at its reply cap without reading, and
        disconnect it: what libzmq still queues for it goes with the connection."""
        budget = self.courier.budget
        for identity, backlog in budget.sweep():
            session = self.registry.sessions.get(identity)
            if session is not None and not session.fenced:
                self.counters["reply_evictions"] += 1
                self.evict(
                    session,
                    f"read none of its {backlog.queued >> 10} KiB of queued replies for "
                    f"{budget.deadline:g} s (reply_cap {budget.cap >> 10} KiB)",
                )
            # Disconnecting drops what libzmq still queues for it; it may knock again.
            self.connections.drop(identity)
            budget.forget(identity)
