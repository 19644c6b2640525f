"""An agent's session with hmmd: one DEALER, a drain loop, requests, heartbeats and acks.

The socket is a plain pyzmq DEALER registered with ``loop.add_reader`` and
drained until ``EVENTS`` has no POLLIN (its FD is edge-triggered). INVALIDATE
is handled synchronously inside the drain loop, under the loop's implicit
lock: every item zaps its mirror's entries at once, and the cumulative ACK for
the burst goes out when no DMA of ours still uses a zapped page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from hmmirror.client.channel import Channel
from hmmirror.client.curve import CurveKeys
from hmmirror.client.errors import DaemonUnavailable, RemoteError, RequestTimeout, SyncIncomplete
from hmmirror.client.mirror import Mirror
from hmmirror.proto.codec import Envelope, encode_ack
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import (
    FRAMES_PHYSICAL,
    MAX_ITEMS,
    MIRROR_COLUMNS,
    MM_COLUMNS,
    Access,
    Event,
    Evicted,
    Goodbye,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Invalidate,
    Inventory,
    InventoryReply,
    Message,
    Register,
    Registered,
    Status,
    StatusReply,
    SyncRange,
    Welcome,
)

log = logging.getLogger(__name__)


class _Shared(asyncio.Future[None]):
    """A future many callers await together, which refuses to be cancelled.

    A cancelled waiter still gets its CancelledError (asyncio raises it when the
    task resumes), but cannot cancel the batch everyone else waits on: what
    ``asyncio.shield`` gives, without a wrapper future per caller.
    """

    def cancel(self, msg: object = None) -> bool:
        """Refuse: one waiter's cancellation must not cancel the shared batch."""
        return False


class Session(Channel):
    """A live session. Create it with ``connect``; it owns its socket and its mirrors."""

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
        self._syncs: dict[tuple[int, int, bool], tuple[list[tuple[int, int]], _Shared]] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self.mirrors: dict[int, Mirror] = {}
        self._acks: deque[tuple[int, list[asyncio.Future[None]]]] = deque()
        self._acked = 0
        self._heartbeat: asyncio.Task[None] | None = None
        self.welcome: Welcome | None = None
        self.invalidations_received = 0
        self._rehello_task: asyncio.Future[None] | None = None
        #: Loop time until which hmmd is known to hold the session: the last
        #: ``heartbeat_ack`` (or ``welcome``) plus the lease (SPEC §5, step 2).
        self._lease_until = 0.0
        self._lease_timer: asyncio.TimerHandle | None = None

    # --- properties announced at HELLO ----------------------------------------------------------

    @property
    def epoch(self) -> str:
        """The daemon's epoch: changes when hmmd restarts."""
        assert self.welcome is not None
        return self.welcome.epoch

    @property
    def zero_pfn(self) -> int:
        """The kernel's zero page as this session's entries name it: its PFN, or its frame
        token (``physical_frames``); 0 if unknown. Compare PFN fields with it, nothing else."""
        assert self.welcome is not None
        return self.welcome.zero_pfn

    @property
    def physical_frames(self) -> bool:
        """Whether entries carry physical frame numbers (root over ipc, or a ``frames =
        "physical"`` grant); otherwise frame tokens, equal exactly when the pages are."""
        assert self.welcome is not None
        return self.welcome.frames == FRAMES_PHYSICAL

    @property
    def max_dma_pages(self) -> int:
        """The largest DMA the daemon accepts, in pages."""
        assert self.welcome is not None
        return self.welcome.max_dma_pages

    @property
    def max_fault_pages(self) -> int:
        """The largest FAULT the daemon accepts, in pages."""
        assert self.welcome is not None
        return self.welcome.max_fault_pages

    # --- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Say HELLO and start heartbeats; raise DaemonUnavailable if hmmd does not answer."""
        try:
            env = await self.request(Hello(agent=self.name[:64], pid=os.getpid()), expect=Welcome)
        except RequestTimeout as exc:
            await self.close()
            raise DaemonUnavailable(
                f"no WELCOME from hmmd at {self.endpoint} in {self.timeout:g} s"
            ) from exc
        except BaseException:
            await self.close()
            raise
        assert isinstance(env.msg, Welcome)
        self._welcomed(env.msg)
        self._heartbeat = asyncio.ensure_future(self._beat())

    async def close(self) -> None:
        """Unregister everything (GOODBYE, best effort), then close the socket."""
        if self._lease_timer is not None:
            self._lease_timer.cancel()
            self._lease_timer = None
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(BaseException):
                await self._heartbeat
            self._heartbeat = None
        if self.welcome is not None and self.lost is None:
            with contextlib.suppress(Exception):
                await self.request(Goodbye(), timeout=1.0)
        for mirror in self.mirrors.values():
            mirror._drop("session closed")
        self._close_socket()

    async def _beat(self) -> None:
        """Send heartbeats: re-hello after a fence, lose the session on silence or a new epoch,
        and then keep asking for a fresh session until hmmd grants one."""
        assert self.welcome is not None
        interval = self.welcome.heartbeat_ms / 1000
        lease = self.welcome.lease_ms / 1000
        while not self._closed:
            if self.lost is not None:
                # Reach hmmd again at once (a lost connection is knocked for anew), then
                # every heartbeat interval while it stays away.
                await self._reopen(lease)
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
                if self.fenced(exc):
                    continue
                raise

    async def heartbeat(self) -> None:
        """One ``heartbeat`` round trip: its ack renews the lease; a new epoch loses the
        session. Raises RequestTimeout (after a lease), DaemonUnavailable or RemoteError."""
        assert self.welcome is not None
        lease = self.welcome.lease_ms / 1000
        env = await self.request(Heartbeat(), timeout=lease, expect=HeartbeatAck)
        assert isinstance(env.msg, HeartbeatAck)
        if env.msg.epoch != self.epoch:
            self._lose(f"hmmd restarted (epoch {self.epoch} -> {env.msg.epoch})")
        elif self.lost is None:
            self._renew_lease()

    def _welcomed(self, welcome: Welcome) -> None:
        """A ``welcome``: the session's terms, and its lease from now."""
        self.welcome = welcome
        self._renew_lease()

    def _renew_lease(self) -> None:
        """hmmd held the session just now: it holds it for a lease more (SPEC §5, step 2)."""
        assert self.welcome is not None
        self._lease_until = self.loop.time() + self.welcome.lease_ms / 1000
        if self._lease_timer is None:
            self._lease_timer = self.loop.call_at(self._lease_until, self._lease_check)

    def _lease_check(self) -> None:
        """The lease timer: lose the session once a whole lease passed with no ack.

        This is a timer, not a heartbeat's own timeout, so that a process that was
        stopped (or whose loop stalled) past its lease finds the session lost before it
        runs anything else: hmmd has evicted it by then, and the eviction notice may
        never come (hmmd's side dropped the connection, its ZMTP heartbeats unanswered).
        """
        self._lease_timer = None
        if self.lost is not None or self._closed:
            return
        if self.loop.time() >= self._lease_until:
            assert self.welcome is not None
            lease = self.welcome.lease_ms / 1000
            self._lose(f"no heartbeat_ack from {self.endpoint} for the {lease:g} s lease")
        else:
            self._lease_timer = self.loop.call_at(self._lease_until, self._lease_check)

    def fenced(self, exc: RemoteError) -> bool:
        """If ``exc`` says hmmd ended this session (FENCED, NO_SESSION), drop every translation
        and open a fresh session (SPEC: after FENCED, drop everything, hello again); say so."""
        if exc.code not in (ErrorCode.FENCED, ErrorCode.NO_SESSION):
            return False
        for mirror in self.mirrors.values():
            mirror._drop(f"session ended by hmmd: {exc}", evicted=True)
        self._rehello()
        return True

    async def _reopen(self, timeout: float) -> None:
        """After a loss: HELLO again; on WELCOME the session is live once more, empty.

        Every mirror was dropped when the session was lost; hmmd (restarted, or
        having expired the lease) remembers none of them, so neither do we.
        """
        try:
            await self.redial()  # hmmd restarted or dropped us: knock again
            env = await self.request(
                Hello(agent=self.name[:64], pid=os.getpid()), timeout=timeout, expect=Welcome
            )
        except (RequestTimeout, RemoteError, DaemonUnavailable):
            return
        assert isinstance(env.msg, Welcome)
        self._welcomed(env.msg)
        self.mirrors = {}
        self._acks.clear()
        self._acked = 0
        log.info("session %s reopened on %s (epoch %s)", self.name, self.endpoint, self.epoch)
        self.lost = None

    def _lose(self, reason: str) -> None:
        """The daemon is gone or restarted: no translation may survive."""
        log.warning("session %s lost: %s", self.name, reason)
        self.lost = reason
        for mirror in self.mirrors.values():
            mirror._drop(reason)

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
            for mirror in self.mirrors.values():
                mirror._drop(f"evicted: {msg.reason}", evicted=True)
            log.warning("session %s evicted by hmmd: %s", self.name, msg.reason)
            self.loop.call_soon(self._rehello)

    def _on_invalidate(self, msg: Invalidate) -> None:
        """Zap the named mirror's entries; queue the ACK behind the DMA fences."""
        self.invalidations_received += 1
        mirror = self.mirrors.get(msg.mirror)
        fences = mirror._invalidate_items(msg.items) if mirror is not None else []
        self._acks.append((msg.n, fences))

    def _advance_acks(self) -> None:
        """ACK the highest n whose zaps are done and whose DMA fences have drained."""
        upto = self._acked
        while self._acks and all(f.done() for f in self._acks[0][1]):
            upto = self._acks.popleft()[0]
        if upto > self._acked:
            # The id is taken like any request's, so the next request never reuses it.
            msg_id = self._next_id
            self._next_id += 1
            with contextlib.suppress(DaemonUnavailable):
                self._send_frames(encode_ack(upto, msg_id))
                self._acked = upto  # only once sent: a later ack must still cover it

    async def rehello(self) -> None:
        """Open a fresh session after an eviction (or join the reopening under way)."""
        self._rehello()
        assert self._rehello_task is not None
        await asyncio.shield(self._rehello_task)

    def _rehello(self) -> None:
        """After eviction the old session is fenced: open a fresh one for future mirrors."""
        if self._rehello_task is not None and not self._rehello_task.done():
            return  # one HELLO at a time: the EVICTED notice and a heartbeat may both ask
        self._acks.clear()
        self._acked = 0

        async def again() -> None:
            """Say HELLO again and keep the new WELCOME; failure is ignored."""
            with contextlib.suppress(Exception):
                env = await self.request(
                    Hello(agent=self.name[:64], pid=os.getpid()), expect=Welcome
                )
                assert isinstance(env.msg, Welcome)
                self._welcomed(env.msg)

        self._rehello_task = asyncio.ensure_future(again())

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
        env = await self.request(
            Register(
                pid=pid,
                start_time=start_time,
                intervals=((start, start + length),),
                access=int(access),
                watch_writes=watch_writes,
                strict_writes=strict_writes,
            ),
            expect=Registered,
        )
        assert isinstance(env.msg, Registered)
        mirror = Mirror(self, env.msg, start, length, Access(access))
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
        if not 0 <= start < end <= 1 << 64:
            raise ValueError(f"sync_range [{start:#x}, {end:#x}) is empty or out of range")
        key = (pid, int(event), strict)
        batch = self._syncs.get(key)
        if batch is None:
            batch = self._syncs[key] = ([], _Shared(loop=self.loop))
            if len(self._syncs) == 1:
                self.loop.call_soon(self._flush_syncs)
        batch[0].append((start, end))
        await batch[1]

    def _flush_syncs(self) -> None:
        """Send this tick's batched ``sync_range`` calls, one task per (pid, event, strict)."""
        batches, self._syncs = self._syncs, {}
        for key, (ranges, fut) in batches.items():
            task = asyncio.ensure_future(self._send_syncs(*key, ranges, fut))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send_syncs(
        self,
        pid: int,
        event: int,
        strict: bool,
        ranges: list[tuple[int, int]],
        fut: asyncio.Future[None],
    ) -> None:
        """Send one batch's ranges as SYNC_RANGE requests; settle ``fut`` with the outcome."""
        try:
            await asyncio.gather(
                *(
                    self.request(
                        SyncRange(
                            pid=pid, ranges=tuple(ranges[i : i + MAX_ITEMS]), event=event,
                            strict=strict,
                        )
                    )
                    for i in range(0, len(ranges), MAX_ITEMS)
                )
            )  # fmt: skip
        except RemoteError as exc:
            if not fut.done():
                failure = SyncIncomplete(exc.message) if exc.code == ErrorCode.INCOMPLETE else exc
                fut.set_exception(failure)
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
        else:
            if not fut.done():
                fut.set_result(None)

    async def status(self) -> dict[str, int | float | str]:
        """The daemon's figures (see ``StatusReply``)."""
        env = await self.request(Status(), expect=StatusReply)
        assert isinstance(env.msg, StatusReply)
        return dict(env.msg.stats)

    def dma_done(self) -> None:
        """A DMA finished: acks waiting on it may go out now."""
        if self._acks:
            self._advance_acks()


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


async def ask(
    endpoint: str,
    msg: Message,
    expect: type[Message],
    timeout: float = 2.0,
    curve: CurveKeys | None = None,
) -> Envelope:
    """One request that needs no session (``status``, ``inventory``); the reply's envelope."""
    if curve is None and endpoint.startswith("tcp://"):
        curve = CurveKeys.from_env()
    session = Session(endpoint, "hmmctl", timeout, curve)
    try:
        return await session.request(msg, expect=expect)
    except RequestTimeout as exc:
        raise DaemonUnavailable(f"no answer from hmmd at {endpoint} in {timeout:g} s") from exc
    finally:
        await session.close()


async def status(
    endpoint: str, timeout: float = 2.0, curve: CurveKeys | None = None
) -> dict[str, int | float | str]:
    """The daemon's figures (what ``hmmctl status`` shows)."""
    env = await ask(endpoint, Status(), StatusReply, timeout, curve)
    assert isinstance(env.msg, StatusReply)
    return dict(env.msg.stats)


async def inventory(
    endpoint: str, timeout: float = 2.0, curve: CurveKeys | None = None
) -> tuple[list[dict[str, int]], list[dict[str, int | str]]]:
    """The daemon's mms and mirrors, one dict per row (``hmmctl mms`` / ``mirrors``)."""
    env = await ask(endpoint, Inventory(), InventoryReply, timeout, curve)
    msg = env.msg
    assert isinstance(msg, InventoryReply)
    mms = [dict(zip(MM_COLUMNS, row, strict=True)) for row in _rows(msg.mms, len(MM_COLUMNS))]
    mirrors: list[dict[str, int | str]] = []
    for row in _rows(msg.mirrors, len(MIRROR_COLUMNS)):
        entry: dict[str, int | str] = dict(zip(MIRROR_COLUMNS, row, strict=True))
        entry["agent"] = str(msg.sessions.get(str(entry["session"]), "?"))
        mirrors.append(entry)
    return mms, mirrors


def _rows(flat: tuple[int, ...], width: int) -> list[tuple[int, ...]]:
    """Split a flattened table into rows of ``width``."""
    return [flat[i : i + width] for i in range(0, len(flat) - width + 1, width)]
