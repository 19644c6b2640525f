"""hmmd's request handlers, and ``HANDLERS``, the table that dispatches to them.

Each handler takes the daemon, the sender's identity, its session (None
before HELLO) and the decoded envelope. It answers inline, or returns an
awaitable for work that must wait (a fault that populates, a strict
``sync_range``); a ``RequestError`` it raises becomes a typed error reply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np
from hmmirror.daemon import authz
from hmmirror.daemon.budget import fault_reply_bytes
from hmmirror.daemon.dma.copier import Copier
from hmmirror.daemon.dma.service import DmaService
from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.fault.service import Pending, attempt, resolve
from hmmirror.daemon.frames import FrameTokens
from hmmirror.daemon.invalidation import Invalidator
from hmmirror.daemon.linux.procfs import (
    PAGE_SHIFT,
    PAGE_SIZE,
    Raw,
    start_time,
)
from hmmirror.daemon.state import Mirror, Mm, Session, Span, UffdWatcher
from hmmirror.proto.codec import Envelope
from hmmirror.proto.entries import Entries, from_wire
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import (
    FRAMES_PHYSICAL,
    FRAMES_TOKEN,
    MAX_DMA_PAGES,
    MAX_FAULT_PAGES,
    MAX_MIRROR_PAGES,
    USER_ADDR_END,
    Access,
    Ack,
    AtomicOp,
    AtomicReply,
    DmaAtomic,
    DmaRead,
    DmaReadReply,
    DmaWrite,
    Event,
    Fault,
    FaultMode,
    FaultReadReply,
    FaultReply,
    Goodbye,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Inventory,
    InventoryReply,
    Message,
    Ok,
    Register,
    Registered,
    Status,
    StatusReply,
    SyncRange,
    Unregister,
    Welcome,
)
from hmmirror.transport.budget import ReplyBudget
from hmmirror.transport.peer import Peer

log = logging.getLogger(__name__)


class Daemon(authz.DaemonView, Protocol):
    """What the handlers use of hmmd (``app.Daemon`` is it): its registry, its services,
    and the calls that answer, reserve reply room and attach or drop mms and mirrors."""

    epoch: str
    zero_pfn: int
    asking: Peer
    sessions: dict[bytes, Session]
    mms: dict[tuple[int, int], Mm]
    mirrors: dict[int, Mirror]
    budget: ReplyBudget
    copier: Copier
    dma: DmaService
    frames: FrameTokens
    invalidator: Invalidator

    def send(
        self,
        identity: bytes,
        msg: Message,
        re: int = 0,
        bulk: Sequence[Any] = (),
        copy: bool = True,
        reserved: int = 0,
    ) -> None:
        """Queue a reply or message to ``identity``."""

    def reserve(self, identity: bytes, nbytes: int, what: str) -> int:
        """Set aside reply room for a bulk reply; EBUSY past the cap."""
        ...

    def reject(
        self, identity: bytes, code: ErrorCode, message: str, re: int, mtype: str, bad: bool
    ) -> None:
        """Answer a request with an error."""

    def answer_failure(self, identity: bytes, env: Envelope, exc: Exception) -> None:
        """Answer a handler's failure."""

    def new_session_id(self) -> int:
        """A fresh session id."""
        ...

    def new_mirror_id(self) -> int:
        """A fresh mirror id."""
        ...

    def close_session(self, session: Session) -> None:
        """Forget ``session``."""

    def attach_mm(self, pid: int, wanted_start: int) -> Mm:
        """The watched Mm of ``pid``."""
        ...

    def drop_mm(self, mm: Mm) -> None:
        """Stop watching ``mm``."""

    def drop_mirror(self, mirror: Mirror) -> None:
        """Forget ``mirror``."""

    def mirror_of(self, session: Session, mirror_id: int) -> Mirror:
        """The live mirror of ``session``, or NO_MIRROR."""
        ...

    def cover_with_uffd(self, mm: Mm) -> None:
        """Register ``mm``'s mirrored VMAs with its uffd."""

    def track_writes(self, mm: Mm) -> None:
        """Arm written-page tracking for ``mm``."""

    def strict_watch(self, mm: Mm) -> UffdWatcher | None:
        """``mm``'s strict-write watch, if it can have one."""
        ...

    def device_write(self, mm: Mm, start: int, end: int) -> AbstractContextManager[None]:
        """Around hmmd's own write into the target."""
        ...


Handler = Callable[[Daemon, bytes, "Session | None", Envelope], "Awaitable[None] | None"]


def _aligned_range(start: int, npages: int, what: str) -> int:
    """Check a page-aligned, non-empty range inside user space; return its end."""
    if start % PAGE_SIZE:
        raise RequestError(ErrorCode.EINVAL, f"{what} start {start:#x} is not page-aligned")
    if npages == 0:
        raise RequestError(ErrorCode.EINVAL, f"{what} of zero pages")
    end = start + (npages << PAGE_SHIFT)
    if end > USER_ADDR_END:
        raise RequestError(ErrorCode.EINVAL, f"{what} [{start:#x}, {end:#x}) leaves user space")
    return end


# --- handlers -------------------------------------------------------------------------------


def on_hello(d: Daemon, identity: bytes, session: Session | None, env: Envelope) -> None:
    """Open a session (replacing any previous one on this connection)."""
    msg = env.msg
    assert isinstance(msg, Hello)
    if session is not None:
        d.close_session(session)
    new = Session(d.new_session_id(), identity, msg.agent, time.monotonic(), peer=d.asking)
    authz.open_session(d, new)
    d.sessions[identity] = new
    log.info("session %d opened by %s (pid %d, %s)", new.id, msg.agent, msg.pid, new.peer.identity)
    d.send(
        identity,
        Welcome(
            session=new.id,
            epoch=d.epoch,
            heartbeat_ms=d.config.heartbeat_ms,
            lease_ms=int(d.config.lease * 1000),
            ack_deadline_ms=int(d.config.ack_deadline * 1000),
            zero_pfn=d.zero_pfn if new.physical_frames else d.frames.token(d.zero_pfn),
            max_fault_pages=MAX_FAULT_PAGES,
            max_dma_pages=MAX_DMA_PAGES,
            frames=FRAMES_PHYSICAL if new.physical_frames else FRAMES_TOKEN,
        ),
        re=env.id,
    )


def on_heartbeat(d: Daemon, identity: bytes, session: Session | None, env: Envelope) -> None:
    """Renew the lease (done on every message) and answer with the epoch."""
    d.send(identity, HeartbeatAck(epoch=d.epoch), re=env.id)


def on_goodbye(d: Daemon, identity: bytes, session: Session | None, env: Envelope) -> None:
    """Close the session and drop its mirrors."""
    assert session is not None
    d.close_session(session)
    d.send(identity, Ok(), re=env.id)


def on_status(d: Daemon, identity: bytes, session: Session | None, env: Envelope) -> None:
    """Report the daemon's figures; needs no session. Counters only, unless the asker is root
    or holds an ``inspect`` grant (``authz.PUBLIC_STATUS``)."""
    d.send(identity, StatusReply(stats=authz.visible_status(d, d.asking)), re=env.id)


def on_inventory(d: Daemon, identity: bytes, session: Session | None, env: Envelope) -> None:
    """List mms, mirrors and sessions (``hmmctl mms`` / ``mirrors``).

    Root and ``inspect`` grants see everything, with or without a session; any other
    agent sees only its own session's mirrors, and without a session is refused.
    """
    everyone = authz.may_inspect(d, d.asking)
    if not everyone and (session is None or session.fenced):
        authz.refuse(
            d, d.asking.identity, "inventory",
            "inventory shows other sessions' mirrors only to root or an inspect grant; "
            "send it from a session to see your own",
        )  # fmt: skip
    if everyone:
        own, sessions = list(d.mirrors.values()), list(d.sessions.values())
        shown = list(d.mms.values())
    else:
        assert session is not None
        own, sessions = list(session.mirrors.values()), [session]
        shown = list({m.mm.key: m.mm for m in own}.values())
    mms: list[int] = []
    for mm in shown[:4096]:
        uffd_level = 0
        if mm.uffd is not None and not mm.uffd.closed:
            uffd_level = 1
        if mm.strict_uffd is not None and not mm.strict_uffd.closed:
            uffd_level = 2
        count = len(mm.mirrors) if everyone else sum(1 for m in own if m.mm is mm)
        mms.extend((mm.pid, mm.start_time, mm.seq, mm.active, count, uffd_level))
    mirrors: list[int] = []
    for m in own[:4096]:
        held = sum(span.held for span in m.spans)
        flags = (1 if m.watch_writes else 0) | (2 if m.strict else 0)
        mirrors.extend((m.id, m.session.id, m.mm.pid, m.lo, m.hi, held, int(m.access), flags))
    names: dict[str, int | float | str] = {
        str(s.id): s.name[:256] for s in sessions[:256] if not s.fenced
    }
    reply = InventoryReply(mms=tuple(mms), mirrors=tuple(mirrors), sessions=names)
    d.send(identity, reply, re=env.id)


def on_register(d: Daemon, identity: bytes, session: Session | None, env: Envelope) -> None:
    """Create a mirror of (pid, intervals, access)."""
    msg = env.msg
    assert isinstance(msg, Register) and session is not None
    if msg.pid == 0:
        raise RequestError(ErrorCode.EINVAL, "pid 0 cannot be mirrored")
    if not msg.access & Access.READ:
        raise RequestError(ErrorCode.EINVAL, "a mirror needs at least READ access")
    if not msg.intervals:
        raise RequestError(ErrorCode.EINVAL, "register needs at least one interval")
    total = sum(end - start for start, end in msg.intervals) >> PAGE_SHIFT
    if total > MAX_MIRROR_PAGES:
        raise RequestError(
            ErrorCode.TOO_LARGE,
            f"register covers {total} pages; at most {MAX_MIRROR_PAGES} per mirror",
        )
    spans: list[tuple[int, int]] = []
    for start, end in sorted(msg.intervals):
        if start % PAGE_SIZE or end % PAGE_SIZE:
            raise RequestError(
                ErrorCode.EINVAL, f"interval [{start:#x}, {end:#x}) is not page-aligned"
            )
        if end > USER_ADDR_END:
            raise RequestError(
                ErrorCode.EINVAL, f"interval [{start:#x}, {end:#x}) leaves user space"
            )
        if spans and start < spans[-1][1]:
            raise RequestError(ErrorCode.EINVAL, "intervals overlap")
        spans.append((start, end))
    access = Access(msg.access)
    checked = authz.authorize(d, session, msg.pid, access, "register")
    if msg.start_time and msg.start_time != checked.start:
        raise RequestError(
            ErrorCode.ESRCH, f"process {msg.pid} started at {checked.start}, not {msg.start_time}"
        )
    mm = d.attach_mm(msg.pid, checked.start)
    try:
        authz.authorize_attached(d, session, mm, checked, access, "register")
    except RequestError:
        if not mm.mirrors:
            d.drop_mm(mm)
        raise
    mirror = Mirror(
        d.new_mirror_id(), session, mm, [Span(lo, hi) for lo, hi in spans], Access(msg.access)
    )
    if msg.strict_writes and d.strict_watch(mm) is None:
        if not mm.mirrors:
            d.drop_mm(mm)
        raise RequestError(
            ErrorCode.EINVAL,
            f"strict_writes needs a second userfaultfd of process {msg.pid} (the target calls "
            "hmmirror.client.expose(strict=True), or hmmd runs with uffd = inject)",
        )
    if msg.watch_writes and not msg.strict_writes and (mm.uffd is None or mm.uffd.closed):
        if not mm.mirrors:
            d.drop_mm(mm)
        raise RequestError(
            ErrorCode.EINVAL,
            f"watch_writes needs process {msg.pid}'s userfaultfd (the target calls "
            "hmmirror.client.expose(), or hmmd runs with uffd = off)",
        )
    mirror.watch_writes = msg.watch_writes or msg.strict_writes
    mirror.strict = msg.strict_writes
    mm.mirrors.append(mirror)
    session.mirrors[mirror.id] = mirror
    d.mirrors[mirror.id] = mirror
    d.counters["registrations"] += 1
    d.cover_with_uffd(mm)
    if mirror.watch_writes and mm.uffd is not None and not mm.uffd.closed:
        d.track_writes(mm)
    d.send(
        identity,
        Registered(mirror=mirror.id, pid=mm.pid, start_time=mm.start_time, seq=mm.seq),
        re=env.id,
    )


def on_unregister(d: Daemon, identity: bytes, session: Session | None, env: Envelope) -> None:
    """Drop a mirror."""
    msg = env.msg
    assert isinstance(msg, Unregister) and session is not None
    mirror = session.mirrors.get(msg.mirror)
    if mirror is None:
        raise RequestError(ErrorCode.NO_MIRROR, f"session {session.id} has no mirror {msg.mirror}")
    d.drop_mirror(mirror)
    d.send(identity, Ok(), re=env.id)


def on_ack(d: Daemon, identity: bytes, session: Session | None, env: Envelope) -> None:
    """Apply a cumulative ACK."""
    msg = env.msg
    assert isinstance(msg, Ack) and session is not None
    if msg.n > d.invalidator.sent(session):
        raise RequestError(ErrorCode.EINVAL, f"ACK({msg.n}) for an INVALIDATE never sent")
    d.invalidator.on_ack(session, msg.n)


#: FaultMode by wire value (the schema bounds ``mode``), without an Enum call per fault.
_FAULT_MODES = tuple(FaultMode)


def on_fault(
    d: Daemon, identity: bytes, session: Session | None, env: Envelope
) -> Awaitable[None] | None:
    """hmm_range_fault for the agent, then the entries as a raw frame.

    A fault that needs no waiting and no faulting-in is answered at once, with
    no task; the others continue in ``_fault_later``.
    """
    msg = env.msg
    assert isinstance(msg, Fault) and session is not None
    mirror = d.mirror_of(session, msg.mirror)
    end = _aligned_range(msg.start, msg.npages, "fault")
    span = mirror.span_for(msg.start, end)
    if span is None:
        raise RequestError(
            ErrorCode.EINVAL, f"fault [{msg.start:#x}, {end:#x}) is outside mirror {mirror.id}"
        )
    mode = _FAULT_MODES[msg.mode]
    if msg.write and mode == FaultMode.POPULATE and not mirror.access & Access.WRITE:
        raise RequestError(
            ErrorCode.EPERM, f"mirror {mirror.id} was registered without WRITE access"
        )
    # The reply's room on the connection is set aside first: a peer that does not read
    # gets EBUSY here, before anything is populated or copied for it.
    reserved = d.reserve(identity, fault_reply_bytes(msg), "fault")
    d.counters["faults"] += 1
    try:
        step = attempt(mirror.mm, msg.start, msg.npages, msg.write, mode, d.zero_pfn)
        if isinstance(step, Pending):
            return _fault_later(d, identity, env, mirror, span, step, reserved)
        _fault_reply(d, identity, env, mirror, span, *step, reserved)
    except BaseException:
        d.budget.unreserve(identity, reserved)
        raise
    return None


async def _fault_later(
    d: Daemon, identity: bytes, env: Envelope, mirror: Mirror, span: Span, first: Pending,
    reserved: int,
) -> None:  # fmt: skip
    """The fault's slow path: wait out invalidations, fault pages in, then reply."""
    msg = env.msg
    assert isinstance(msg, Fault)
    mode = _FAULT_MODES[msg.mode]
    try:
        entries, raw = await resolve(
            mirror.mm, msg.start, msg.npages, msg.write, mode, d.zero_pfn, d.copier, first
        )
        _fault_reply(d, identity, env, mirror, span, entries, raw, reserved)
    except BaseException:
        d.budget.unreserve(identity, reserved)
        raise


def _fault_reply(
    d: Daemon, identity: bytes, env: Envelope, mirror: Mirror, span: Span, entries: Entries,
    raw: Raw, reserved: int,
) -> None:  # fmt: skip
    """Record what is handed out and send it (in place of the ``reserved`` bytes); no await
    from the pagemap read to the hand-out, so a later invalidation is always sent after this
    reply. Raises only before anything is sent."""
    msg = env.msg
    assert isinstance(msg, Fault)
    if mirror.dead:
        raise RequestError(ErrorCode.NO_MIRROR, f"mirror {mirror.id} was dropped during the fault")
    if msg.mode != FaultMode.SNAPSHOT:  # POPULATE and PRESENT entries may be installed
        if not mirror.access & Access.WRITE:
            entries &= ~np.uint64(1 << 62)
        span.hand_out(msg.start, entries, raw)
        strict = mirror.mm.strict_uffd if mirror.strict else None
        if strict is not None and not strict.closed:
            # The mirror may now hold these pages: the next write to them waits for its ack.
            end = msg.start + (msg.npages << PAGE_SHIFT)
            try:
                strict.cover_range(msg.start, end)
                strict.protect(msg.start, end)
            except OSError as exc:
                log.warning("strict userfaultfd of pid %d failed: %s", mirror.mm.pid, exc)
                strict.close()
        uffd_watch = mirror.mm.uffd
        if uffd_watch is not None and not uffd_watch.closed:
            # A VMA mapped since the last poll raises no event until registered: register
            # it before the agent can hold a translation from it.
            try:
                uffd_watch.cover_range(msg.start, msg.start + (msg.npages << PAGE_SHIFT))
            except OSError as exc:
                log.warning("userfaultfd of pid %d failed (%s): proc only", mirror.mm.pid, exc)
                uffd_watch.close()
    if msg.read and msg.mode == FaultMode.POPULATE and msg.npages <= MAX_DMA_PAGES:
        # The device's access, done in the fault's own trip and checked like any DMA read.
        # Its copy runs on the target's worker: an invalidation that starts meanwhile goes
        # out before this reply, so the agent discards the reply and faults again.
        def with_data(data: object) -> None:
            d.counters["dma_reads"] += 1
            _send_fault_reply(d, identity, env, mirror, entries, data, reserved)

        def without(_: Exception) -> None:  # the agent reads, and sees why, itself
            _send_fault_reply(d, identity, env, mirror, entries, None, reserved)

        try:
            d.dma.read(mirror.mm, msg.start, msg.npages, entries, False, with_data, without)
            return
        except RequestError:
            pass
    _send_fault_reply(d, identity, env, mirror, entries, None, reserved)


def _send_fault_reply(
    d: Daemon, identity: bytes, env: Envelope, mirror: Mirror, entries: Entries,
    data: object | None, reserved: int,
) -> None:  # fmt: skip
    """FAULT_READ_REPLY with the entries and ``data``, or FAULT_REPLY with the entries only,
    in place of the ``reserved`` reply bytes."""
    msg = env.msg
    assert isinstance(msg, Fault)
    if mirror.dead:
        d.budget.unreserve(identity, reserved)
        d.answer_failure(
            identity,
            env,
            RequestError(ErrorCode.NO_MIRROR, f"mirror {mirror.id} was dropped during the fault"),
        )
        return
    seq = mirror.mm.seq
    _to_agent(d, mirror.session, entries)
    if data is not None:
        both = FaultReadReply(mirror=mirror.id, start=msg.start, npages=msg.npages, seq=seq)
        d.send(identity, both, re=env.id, bulk=[entries, data], copy=False, reserved=reserved)
        return
    reply = FaultReply(mirror=mirror.id, start=msg.start, npages=msg.npages, seq=seq)
    # entries is a fresh little-endian u64 array nobody mutates now: send its buffer as is.
    d.send(identity, reply, re=env.id, bulk=[entries], copy=False, reserved=reserved)


def _failer(
    d: Daemon, identity: bytes, env: Envelope, reserved: int = 0
) -> Callable[[Exception], None]:
    """What answers a request whose copy failed: its typed error reply (and the reply bytes
    it had set aside given back)."""

    def fail(exc: Exception) -> None:
        d.budget.unreserve(identity, reserved)
        d.answer_failure(identity, env, exc)

    return fail


def _to_agent(d: Daemon, session: Session, entries: Entries) -> None:
    """Make ``entries`` (already recorded as handed out) what the session may see: frame
    tokens in place of PFNs unless it has physical frames. Done in place, last thing."""
    if not session.physical_frames:
        d.frames.tokenize(entries)


def _from_agent(d: Daemon, session: Session, frame: bytes | memoryview, npages: int) -> Entries:
    """The entries a DMA request names, with the PFNs hmmd compares against the pagemap:
    a session without physical frames names pages by their tokens."""
    entries = from_wire(frame, npages)
    return entries if session.physical_frames else d.frames.physical(entries)


def _dma_target(d: Daemon, session: Session, mirror_id: int, start: int, npages: int) -> Mirror:
    """The live mirror a DMA names, checked to cover the page-aligned range."""
    mirror = d.mirror_of(session, mirror_id)
    end = _aligned_range(start, npages, "DMA")
    if mirror.span_for(start, end) is None:
        raise RequestError(
            ErrorCode.EINVAL, f"DMA [{start:#x}, {end:#x}) is outside mirror {mirror.id}"
        )
    return mirror


def on_dma_read(d: Daemon, identity: bytes, session: Session | None, env: Envelope) -> None:
    """A device read through the agent's translations."""
    msg = env.msg
    assert isinstance(msg, DmaRead) and session is not None
    mirror = _dma_target(d, session, msg.mirror, msg.start, msg.npages)
    # Room for the data first: a peer that does not read gets EBUSY, and no buffer.
    reserved = d.reserve(identity, msg.npages << PAGE_SHIFT, "dma_read")
    d.counters["dma_reads"] += 1
    entries = _from_agent(d, session, env.bulk[0], msg.npages)
    end = msg.start + (msg.npages << PAGE_SHIFT)
    pending = d.invalidator.pending_for(mirror, msg.start, end)

    def reply(data: object) -> None:
        answer = DmaReadReply(mirror=mirror.id, start=msg.start, npages=msg.npages)
        d.send(identity, answer, re=env.id, bulk=[data], copy=False, reserved=reserved)

    try:
        d.dma.read(
            mirror.mm, msg.start, msg.npages, entries, pending, reply,
            _failer(d, identity, env, reserved),
        )  # fmt: skip
    except BaseException:
        d.budget.unreserve(identity, reserved)
        raise


def on_dma_write(d: Daemon, identity: bytes, session: Session | None, env: Envelope) -> None:
    """A device write through the agent's translations."""
    msg = env.msg
    assert isinstance(msg, DmaWrite) and session is not None
    mirror = _writable_dma_target(d, session, msg.mirror, msg.start, msg.npages)
    length = msg.length or msg.npages << PAGE_SHIFT
    if not (msg.npages - 1) << PAGE_SHIFT < msg.offset + length <= msg.npages << PAGE_SHIFT:
        raise RequestError(
            ErrorCode.EINVAL,
            f"DMA write of {length} bytes at offset {msg.offset} does not span exactly "
            f"{msg.npages} pages",
        )
    d.counters["dma_writes"] += 1
    entries = _from_agent(d, session, env.bulk[0], msg.npages)
    end = msg.start + (msg.npages << PAGE_SHIFT)
    pending = d.invalidator.pending_for(mirror, msg.start, end)
    d.dma.write(
        mirror.mm, msg.start, msg.npages, entries, env.bulk[1], pending, msg.offset,
        d.device_write(mirror.mm, msg.start, end),
        lambda: d.send(identity, Ok(), re=env.id), _failer(d, identity, env),
    )  # fmt: skip


def on_dma_atomic(d: Daemon, identity: bytes, session: Session | None, env: Envelope) -> None:
    """An 8-byte device atomic: read, compute and write as one job of the target's worker."""
    msg = env.msg
    assert isinstance(msg, DmaAtomic) and session is not None
    mirror = _writable_dma_target(d, session, msg.mirror, msg.start, 1)
    if msg.offset % 8:
        raise RequestError(ErrorCode.EINVAL, f"atomic at offset {msg.offset} is not 8-aligned")
    d.counters["dma_atomics"] += 1
    entries = _from_agent(d, session, env.bulk[0], 1)
    pending = d.invalidator.pending_for(mirror, msg.start, msg.start + (1 << PAGE_SHIFT))
    d.dma.atomic(
        mirror.mm, msg.start + msg.offset, entries, AtomicOp(msg.op), (msg.compare_add, msg.swap),
        pending, d.device_write(mirror.mm, msg.start, msg.start + PAGE_SIZE),
        lambda old: d.send(identity, AtomicReply(old=old), re=env.id), _failer(d, identity, env),
    )  # fmt: skip


def _writable_dma_target(
    d: Daemon, session: Session, mirror_id: int, start: int, npages: int
) -> Mirror:
    """Like ``_dma_target``, and the mirror must have been registered with WRITE access."""
    mirror = _dma_target(d, session, mirror_id, start, npages)
    if not mirror.access & Access.WRITE:
        raise RequestError(
            ErrorCode.EPERM, f"mirror {mirror.id} was registered without WRITE access"
        )
    return mirror


def on_sync_range(d: Daemon, identity: bytes, session: Session | None, env: Envelope) -> None:
    """The target's own sync_cpu_device_pagetables: invalidate now, answer after every ack."""
    msg = env.msg
    assert isinstance(msg, SyncRange)
    if not msg.ranges:
        raise RequestError(ErrorCode.EINVAL, "sync_range names no range")
    try:
        event = Event(msg.event)
    except ValueError as exc:
        raise RequestError(ErrorCode.EINVAL, f"unknown event {msg.event}") from exc
    if event in (Event.RELEASE, Event.EVICT):
        # Only hmmd says a process is gone or a mirror is evicted: an agent that could send
        # these would switch off other agents' mirrors for good.
        raise RequestError(ErrorCode.EINVAL, f"sync_range may not announce {event.name}")
    assert session is not None
    # Invalidating is acting on the target's mirrors: the same right as writing it.
    mms = [mm for mm in d.mms.values() if mm.pid == msg.pid and not mm.released]
    authz.authorize_sync_range(d, session, msg.pid, watched=bool(mms))
    if not mms:
        try:
            start_time(msg.pid)
        except ProcessLookupError as exc:
            raise RequestError(ErrorCode.ESRCH, f"no process {msg.pid}") from exc
    ranges = list(msg.ranges)
    started = [d.invalidator.begin(mm, ranges, event) for mm in mms]
    pending = [inv for inv in started if not inv.finished]

    def answer() -> None:
        """Every invalidation is complete: OK, or INCOMPLETE for a strict caller."""
        gone = [who for inv in started for who in inv.not_acked]
        if msg.strict and gone:
            text = f"invalidated, but not acked by {', '.join(gone)} (evicted or gone)"
            d.reject(identity, ErrorCode.INCOMPLETE, text[:1024], env.id, env.type, bad=False)
        else:
            d.send(identity, Ok(), re=env.id)

    if not pending:
        answer()
        return
    # Answer from the completion itself, inside the ACK's handling: no task, no extra turn.
    left = [len(pending)]

    def one_done() -> None:
        """One invalidation completed: answer once all of them have."""
        left[0] -= 1
        if left[0] == 0:
            answer()

    for inv in pending:
        inv.on_done.append(one_done)


#: Handlers served even when the connection is at its reply cap: they answer nothing or
#: little, and keep a slow but live agent's lease and acks going.
UNGATED: frozenset[Handler] = frozenset({on_heartbeat, on_ack, on_goodbye})

#: The dispatch table: message class → (handler, needs a live session).
HANDLERS: dict[type[Message], tuple[Handler, bool]] = {
    Hello: (on_hello, False),
    Heartbeat: (on_heartbeat, True),
    Goodbye: (on_goodbye, True),
    Status: (on_status, False),
    Inventory: (on_inventory, False),
    Register: (on_register, True),
    Unregister: (on_unregister, True),
    Ack: (on_ack, True),
    Fault: (on_fault, True),
    DmaRead: (on_dma_read, True),
    DmaWrite: (on_dma_write, True),
    DmaAtomic: (on_dma_atomic, True),
    SyncRange: (on_sync_range, True),
}
