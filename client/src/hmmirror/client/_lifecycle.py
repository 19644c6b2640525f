"""A session's life with hmmd: HELLO, the lease and its heartbeats, fences and losses.

One state machine (``State``), one HELLO (``_hello``)::

    LIVE ──EVICTED, FENCED or NO_SESSION──▶ FENCED ──WELCOME──▶ LIVE
    LIVE ──lease expired, connection gone, new epoch──▶ LOST ──redial, WELCOME──▶ LIVE

FENCED: hmmd ended the session. Every mirror is dropped (evicted), and one
re-HELLO runs on the same connection (``_fence``). LOST: hmmd is gone,
restarted, or let the lease run out (SPEC §5, step 2). Every mirror is dropped,
and the heartbeat task redials and says HELLO every heartbeat interval until
hmmd welcomes it (``_rejoin``). A WELCOME always starts from nothing: no
mirrors survive, and no acks are owed (the new session counts INVALIDATEs from 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from collections.abc import Mapping

from hmmirror.client._acks import AckQueue
from hmmirror.client._reaper import reap
from hmmirror.client.channel import Channel
from hmmirror.client.curve import CurveKeys
from hmmirror.client.errors import DaemonUnavailable, RemoteError, RequestTimeout
from hmmirror.client.mirror import Mirror
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import (
    FRAMES_PHYSICAL,
    Goodbye,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Ok,
    Welcome,
)

log = logging.getLogger(__name__)

#: The error codes by which hmmd says it holds no session of ours any more.
_ENDED = (ErrorCode.FENCED, ErrorCode.NO_SESSION)


class State(enum.Enum):
    """Where a session stands (``Lifecycle.state``)."""

    #: hmmd holds the session: mirrors and requests work.
    LIVE = "live"
    #: hmmd holds no session of ours (not yet, or it ended ours): a HELLO is due.
    FENCED = "fenced"
    #: The connection or the lease is gone: the heartbeat task redials and says HELLO.
    LOST = "lost"
    #: ``close`` ran.
    CLOSED = "closed"


class Lifecycle(Channel):
    """The state machine under ``Session``: it owns the session's mirrors and owed acks,
    and drops them whenever hmmd no longer holds the session."""

    what = "hmmd"

    def __init__(
        self,
        endpoint: str,
        name: str,
        timeout: float,
        curve: CurveKeys | None = None,
        options: Mapping[int, int] | None = None,
    ) -> None:
        super().__init__(endpoint, timeout, curve, options)
        self.name = name
        self.mirrors: dict[int, Mirror] = {}
        self._acks = AckQueue()
        self.welcome: Welcome | None = None
        self._fenced = True
        self._heartbeat: asyncio.Task[None] | None = None
        #: The re-HELLO after a fence, while one runs (one at a time).
        self._hello_task: asyncio.Future[None] | None = None
        #: Loop time until which hmmd is known to hold the session: the last
        #: ``heartbeat_ack`` (or ``welcome``) plus the lease (SPEC §5, step 2).
        self._lease_until = 0.0
        self._lease_timer: asyncio.TimerHandle | None = None

    @property
    def state(self) -> State:
        """Where the session stands now."""
        if self._closed:
            return State.CLOSED
        if self.lost is not None:
            return State.LOST
        return State.FENCED if self._fenced else State.LIVE

    # --- properties announced at HELLO ----------------------------------------------------------

    @property
    def _terms(self) -> Welcome:
        """The WELCOME's terms; a session that was never welcomed has none."""
        if self.welcome is None:
            raise DaemonUnavailable(f"no session with hmmd at {self.endpoint} yet")
        return self.welcome

    @property
    def epoch(self) -> str:
        """The daemon's epoch: changes when hmmd restarts."""
        return self._terms.epoch

    @property
    def zero_pfn(self) -> int:
        """The kernel's zero page as this session's entries name it: its PFN, or its frame
        token (``physical_frames``); 0 if unknown. Compare PFN fields with it, nothing else."""
        return self._terms.zero_pfn

    @property
    def physical_frames(self) -> bool:
        """Whether entries carry physical frame numbers (root over ipc, or a ``frames =
        "physical"`` grant); otherwise frame tokens, equal exactly when the pages are."""
        return self._terms.frames == FRAMES_PHYSICAL

    @property
    def max_dma_pages(self) -> int:
        """The largest DMA the daemon accepts, in pages."""
        return self._terms.max_dma_pages

    @property
    def max_fault_pages(self) -> int:
        """The largest FAULT the daemon accepts, in pages."""
        return self._terms.max_fault_pages

    # --- the one HELLO --------------------------------------------------------------------------

    async def _hello(self, timeout: float | None = None) -> None:
        """Ask hmmd for a session; on WELCOME it is LIVE, owing no acks, with a lease from now."""
        welcome = await self.call(
            Hello(agent=self.name[:64], pid=os.getpid()), Welcome, timeout=timeout
        )
        why = welcome.unusable()
        if why is not None:
            raise DaemonUnavailable(f"hmmd at {self.endpoint} offered unusable terms: {why}")
        self.welcome = welcome
        self._acks.clear()
        self._fenced = False
        self.lost = None
        self._renew_lease()
        self._welcomed()

    def _welcomed(self) -> None:
        """A WELCOME made the session LIVE (the first, or after a fence or a loss): what a
        subclass attaches to a session (its DMA window) it attaches again here."""

    async def open(self) -> None:
        """Say HELLO and start heartbeats; raise DaemonUnavailable if hmmd does not answer."""
        try:
            await self._hello()
        except RequestTimeout as exc:
            await self.close()
            raise DaemonUnavailable(
                f"no WELCOME from hmmd at {self.endpoint} in {self.timeout:g} s"
            ) from exc
        except BaseException:
            await self.close()
            raise
        self._heartbeat = asyncio.ensure_future(self._beat())

    async def close(self) -> None:
        """Unregister everything (GOODBYE, best effort), then close the socket."""
        if self._lease_timer is not None:
            self._lease_timer.cancel()
            self._lease_timer = None
        try:
            if self._heartbeat is not None:
                self._heartbeat.cancel()
                await reap(self._heartbeat)
                self._heartbeat = None
            if self.welcome is not None and self.lost is None:
                with contextlib.suppress(Exception):
                    await self.call(Goodbye(), Ok, timeout=1.0)
        finally:
            for mirror in self.mirrors.values():
                mirror._drop("session closed")
            self._close_socket()

    # --- FENCED: hmmd ended the session -------------------------------------------------------

    def rehello_if_fenced(self, exc: RemoteError) -> bool:
        """If ``exc`` says hmmd ended this session (FENCED, NO_SESSION), drop every translation
        and HELLO again (SPEC: after FENCED, drop everything, hello again); say whether it did."""
        if exc.code not in _ENDED:
            return False
        self._drop_all(f"session ended by hmmd: {exc}", evicted=True)
        self._fence()
        return True

    async def rehello(self) -> None:
        """HELLO again after an eviction (or join the re-HELLO under way)."""
        self._fence()
        assert self._hello_task is not None
        await asyncio.shield(self._hello_task)

    def _fence(self) -> None:
        """Enter FENCED (the caller dropped the mirrors) and HELLO again, one at a time: the
        EVICTED notice and a heartbeat's FENCED may both ask. A failed HELLO stays FENCED."""
        if self._hello_task is not None and not self._hello_task.done():
            return
        self._fenced = True
        self._acks.clear()
        self._hello_task = asyncio.ensure_future(self._hello_quietly())

    async def _hello_quietly(self) -> None:
        """The re-HELLO after a fence: failure is ignored (the next fence tries again)."""
        with contextlib.suppress(Exception):
            await self._hello()

    def _drop_all(self, reason: str, evicted: bool = False) -> None:
        """hmmd no longer holds the session: no translation may survive."""
        for mirror in self.mirrors.values():
            mirror._drop(reason, evicted=evicted)

    # --- LOST: the connection or the lease is gone -------------------------------------------

    def _lose(self, reason: str) -> None:
        """Enter LOST: the daemon is gone or restarted, or the lease ran out."""
        log.warning("session %s lost: %s", self.name, reason)
        self.lost = reason
        self._drop_all(reason)

    async def _rejoin(self, timeout: float) -> None:
        """Leave LOST: a fresh connection (hmmd restarted or dropped us) and HELLO; on
        WELCOME the session is live once more and empty (hmmd remembers none of its
        mirrors, so neither do we). A failure leaves it LOST."""
        try:
            await self.redial()
            await self._hello(timeout)
        except (RequestTimeout, RemoteError, DaemonUnavailable):
            return
        self.mirrors = {}
        log.info("session %s reopened on %s (epoch %s)", self.name, self.endpoint, self.epoch)

    # --- the lease ------------------------------------------------------------------------------

    async def _beat(self) -> None:
        """Send heartbeats: HELLO again after a fence, enter LOST on silence or a new epoch,
        and then keep asking for a fresh session until hmmd grants one."""
        interval = self._terms.heartbeat_ms / 1000
        lease = self._terms.lease_ms / 1000
        while not self._closed:
            if self.lost is not None:
                # Reach hmmd again at once (a lost connection is knocked for anew), then
                # every heartbeat interval while it stays away.
                await self._rejoin(lease)
                if self.lost is not None:
                    await asyncio.sleep(interval)
                continue
            await asyncio.sleep(interval)
            try:
                await self.heartbeat()
            except RequestTimeout:
                continue  # the lease timer has lost the session by now
            except DaemonUnavailable as exc:  # the connection itself is gone (hmmd restarted)
                self._lose(str(exc))
                continue
            except RemoteError as exc:
                if self.rehello_if_fenced(exc):
                    continue
                raise

    async def heartbeat(self) -> None:
        """One ``heartbeat`` round trip: its ack renews the lease; a new epoch loses the
        session. Raises RequestTimeout (after a lease), DaemonUnavailable or RemoteError."""
        lease = self._terms.lease_ms / 1000
        ack = await self.call(Heartbeat(), HeartbeatAck, timeout=lease)
        if ack.epoch != self.epoch:
            self._lose(f"hmmd restarted (epoch {self.epoch} -> {ack.epoch})")
        elif self.lost is None:
            self._renew_lease()

    def _renew_lease(self) -> None:
        """hmmd held the session just now: it holds it for a lease more (SPEC §5, step 2)."""
        self._lease_until = self.loop.time() + self._terms.lease_ms / 1000
        if self._lease_timer is None:
            self._lease_timer = self.loop.call_at(self._lease_until, self._lease_check)

    def _lease_check(self) -> None:
        """The lease timer: lose the session once a whole lease passed with no ack.

        This is a timer, not a heartbeat's own timeout, so that a process that was
        stopped (or whose loop stalled) past its lease finds the session lost before it
        runs anything else: hmmd has evicted it by then, and the eviction notice may
        never come (hmmd's side dropped the connection, silent past its idle sweep).
        """
        self._lease_timer = None
        if self.lost is not None or self._closed:
            return
        if self.loop.time() >= self._lease_until:
            lease = self._terms.lease_ms / 1000
            self._lose(f"no heartbeat_ack from {self.endpoint} for the {lease:g} s lease")
        else:
            self._lease_timer = self.loop.call_at(self._lease_until, self._lease_check)
