"""hmmd's request handlers for sessions, mirrors and acks, and ``HANDLERS``, the table that
dispatches to every handler.

Each handler takes hmmd's services (``request.Services``, a narrow interface,
never the daemon) and the request (``request.Request``: the sender's identity,
its session, None before HELLO, the decoded envelope, and who the transport
proved the sender to be). It answers inline, or returns an awaitable for work
that must wait; a ``RequestError`` it raises becomes a typed error reply. The
FAULT path's handler is ``fault.handlers``, the DMA path's ``dma.handlers``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

from hmmirror.daemon import authz, logfmt
from hmmirror.daemon.dma.handlers import (
    on_dma_atomic,
    on_dma_read,
    on_dma_read_into,
    on_dma_write,
    on_dma_write_from,
    on_window_open,
)
from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.fault.handlers import on_fault
from hmmirror.daemon.linux.procfs import PAGE_SHIFT, PAGE_SIZE, start_time
from hmmirror.daemon.owners import Moved
from hmmirror.daemon.request import Handler, Request, Services, whole_pages
from hmmirror.daemon.state import Mirror, Session, Span
from hmmirror.daemon.trace import tracer
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
    DmaAtomic,
    DmaRead,
    DmaReadInto,
    DmaWrite,
    DmaWriteFrom,
    Event,
    Fault,
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
    Trace,
    TraceReply,
    Unregister,
    Welcome,
    WindowOpen,
)

log = logging.getLogger(__name__)
#: Sessions opened and said goodbye to: a peer may open and close them back to back.
_sessions_log = logfmt.Limited(log, "session openings and goodbyes", burst=100)


def on_hello(svc: Services, r: Request) -> None:
    """Open a session (replacing any previous one on this connection)."""
    identity, session, env = r.identity, r.session, r.env
    msg = env.msg
    assert isinstance(msg, Hello)
    if session is not None:
        svc.close_session(session)
    new = Session(svc.registry.new_session_id(), identity, msg.agent, time.monotonic(), peer=r.peer)
    authz.open_session(svc, new, r.vouched)
    new.version = env.version
    svc.registry.add_session(new)
    _sessions_log.info(
        "session %d opened by %s (pid %d, %s)", new.id, msg.agent, msg.pid, new.peer.identity,
        extra=logfmt.fields(session=new.id, agent=msg.agent, pid=msg.pid, peer=new.peer.identity),
    )  # fmt: skip
    svc.send(
        identity,
        Welcome(
            session=new.id,
            epoch=svc.epoch,
            heartbeat_ms=svc.config.heartbeat_ms,
            lease_ms=int(svc.config.lease * 1000),
            ack_deadline_ms=int(svc.config.ack_deadline * 1000),
            zero_pfn=svc.zero_pfn if new.physical_frames else svc.frames.token(svc.zero_pfn),
            max_fault_pages=MAX_FAULT_PAGES,
            max_dma_pages=MAX_DMA_PAGES,
            frames=FRAMES_PHYSICAL if new.physical_frames else FRAMES_TOKEN,
            window_max=svc.windows.offer(new),
        ),
        re=env.id,
    )


def on_heartbeat(svc: Services, r: Request) -> None:
    """Renew the lease (done on every message) and answer with the epoch."""
    identity, env = r.identity, r.env
    svc.send(identity, HeartbeatAck(epoch=svc.epoch), re=env.id)


def on_goodbye(svc: Services, r: Request) -> None:
    """Close the session and drop its mirrors."""
    identity, session, env = r.identity, r.session, r.env
    assert session is not None
    mirrors = len(session.mirrors)
    svc.close_session(session)
    _sessions_log.info(
        "session %d of %s closed by its agent (goodbye); %d mirrors dropped",
        session.id, session.name, mirrors,
        extra=logfmt.fields(session=session.id, agent=session.name),
    )  # fmt: skip
    svc.send(identity, Ok(), re=env.id)


def on_status(svc: Services, r: Request) -> None:
    """Report the daemon's figures; needs no session. Counters only, unless the asker is root
    or holds an ``inspect`` grant (``authz.PUBLIC_STATUS``)."""
    identity, env = r.identity, r.env
    svc.send(identity, StatusReply(stats=authz.visible_status(svc, r.peer)), re=env.id)


def on_inventory(svc: Services, r: Request) -> None:
    """List mms, mirrors and sessions (``hmmctl mms`` / ``mirrors``).

    Root and ``inspect`` grants see everything, with or without a session; any other
    agent sees only its own session's mirrors, and without a session is refused.
    """
    identity, session, env = r.identity, r.session, r.env
    everyone = authz.may_inspect(svc, r.peer)
    if not everyone and (session is None or session.fenced):
        authz.refuse(
            svc, r.peer.identity, "inventory",
            "inventory shows other sessions' mirrors only to root or an inspect grant; "
            "send it from a session to see your own",
        )  # fmt: skip
    if everyone:
        own, sessions = list(svc.registry.mirrors.values()), list(svc.registry.sessions.values())
        shown = list(svc.registry.mms.values())
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
        str(each.id): each.name[:256] for each in sessions[:256] if not each.fenced
    }
    reply = InventoryReply(mms=tuple(mms), mirrors=tuple(mirrors), sessions=names)
    svc.send(identity, reply, re=env.id)


def on_trace(svc: Services, r: Request) -> Awaitable[None]:
    """Record the timeline (``trace.tracer``) for ``duration_ms``, then answer with it.

    Root and ``inspect`` grants only (it shows every session's faults and ranges), with or
    without a session; one trace at a time.
    """
    identity, env = r.identity, r.env
    msg = env.msg
    assert isinstance(msg, Trace)
    if not authz.may_inspect(svc, r.peer):
        authz.refuse(
            svc, r.peer.identity, "trace",
            "trace shows every session's faults and invalidations: root or an inspect "
            "grant only",
        )  # fmt: skip
    if tracer.on:
        raise RequestError(ErrorCode.EBUSY, "a trace is running already: try again after it")
    if msg.duration_ms == 0 or msg.max_events == 0:
        raise RequestError(ErrorCode.EINVAL, "trace needs duration_ms and max_events above 0")
    tracer.start(msg.max_events)
    return _trace_for(svc, identity, env.id, msg.duration_ms / 1000)


async def _trace_for(svc: Services, identity: bytes, re: int, seconds: float) -> None:
    """Let the tracer record for ``seconds`` (stopped however this ends), then answer."""
    try:
        await asyncio.sleep(seconds)
    finally:
        kept = tracer.stop()
    reply = TraceReply(
        count=kept.count, dropped=kept.dropped, duration_ns=kept.duration_ns, names=kept.names
    )
    svc.send(identity, reply, re=re, bulk=[kept.events])


def on_register(svc: Services, r: Request) -> None:
    """Create a mirror of (pid, intervals, access)."""
    identity, session, env = r.identity, r.session, r.env
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
    full = svc.registry.room_for(session.peer, total)
    if full is not None:  # before the mirror's shadow arrays are made
        svc.counters["mirror_refusals"] += 1
        raise RequestError(ErrorCode.TOO_LARGE, full)
    access = Access(msg.access)
    checked = authz.authorize(svc, session, msg.pid, access, "register")
    if msg.start_time and msg.start_time != checked.start:
        raise RequestError(
            ErrorCode.ESRCH, f"process {msg.pid} started at {checked.start}, not {msg.start_time}"
        )
    mm = svc.attach_mm(msg.pid, checked.start)
    try:
        authz.authorize_attached(svc, session, mm, checked, access, "register")
    except RequestError:
        if not mm.mirrors:
            svc.registry.drop_mm(mm)
        raise
    spans_of = [Span(lo, hi) for lo, hi in spans]
    mirror = Mirror(svc.registry.new_mirror_id(), session, mm, spans_of, Access(msg.access))
    if msg.strict_writes and svc.strict_watch(mm) is None:
        if not mm.mirrors:
            svc.registry.drop_mm(mm)
        raise RequestError(ErrorCode.EINVAL, _no_uffd(svc, msg.pid, "strict_writes"))
    if msg.watch_writes and not msg.strict_writes and (mm.uffd is None or mm.uffd.closed):
        if not mm.mirrors:
            svc.registry.drop_mm(mm)
        raise RequestError(ErrorCode.EINVAL, _no_uffd(svc, msg.pid, "watch_writes"))
    mirror.watch_writes = msg.watch_writes or msg.strict_writes
    mirror.strict = msg.strict_writes
    svc.registry.add_mirror(mirror)
    svc.counters["registrations"] += 1
    svc.cover_with_uffd(mm)
    if mirror.watch_writes and mm.uffd is not None and not mm.uffd.closed:
        svc.track_writes(mm)
    svc.send(
        identity,
        Registered(mirror=mirror.id, pid=mm.pid, start_time=mm.start_time, seq=mm.seq),
        re=env.id,
    )


def _no_uffd(svc: Services, pid: int, flag: str) -> str:
    """Why ``register`` with ``flag`` (watch_writes or strict_writes) is refused: the
    userfaultfd it needs is missing, and what would provide one under this daemon's config."""
    strict = flag == "strict_writes"
    need = (
        f"a second, strict userfaultfd of process {pid}"
        if strict
        else f"a userfaultfd of process {pid}"
    )
    if svc.config.uffd == "off":
        return f"{flag} needs {need}, and this hmmd runs with uffd = off, which takes none"
    expose = "hmmirror.client.expose(strict=True)" if strict else "hmmirror.client.expose()"
    how = f"the target calls {expose} first"
    if svc.config.uffd != "inject":
        how += ", or hmmd runs with uffd = inject"
    return f"{flag} needs {need}, and hmmd holds none ({how})"


def on_unregister(svc: Services, r: Request) -> None:
    """Drop a mirror. One that RELEASE or EVICT ended is already dead (SPEC §6.5): the daemon
    drops it itself once that invalidation completes, so it is NO_MIRROR from the moment the
    item is sent, not only once the last mirror of the process has acked."""
    identity, session, env = r.identity, r.session, r.env
    msg = env.msg
    assert isinstance(msg, Unregister) and session is not None
    mirror = session.mirrors.get(msg.mirror)
    if mirror is None or mirror.dead:
        raise RequestError(ErrorCode.NO_MIRROR, f"session {session.id} has no mirror {msg.mirror}")
    if mirror.mm.released:
        raise RequestError(
            ErrorCode.NO_MIRROR,
            f"mirror {msg.mirror} of session {session.id} was ended by hmmd (its process "
            f"{mirror.mm.pid} exited, or could no longer be watched); nothing to unregister",
        )
    svc.registry.drop_mirror(mirror)
    svc.send(identity, Ok(), re=env.id)


def on_ack(svc: Services, r: Request) -> None:
    """Apply a cumulative ACK."""
    session, env = r.session, r.env
    msg = env.msg
    assert isinstance(msg, Ack) and session is not None
    if msg.n > svc.invalidator.sent(session):
        raise RequestError(ErrorCode.EINVAL, f"ACK({msg.n}) for an INVALIDATE never sent")
    if tracer.on:
        _trace_ack(svc, session, msg.n)
    svc.invalidator.on_ack(session, msg.n)


def _trace_ack(svc: Services, session: Session, n: int) -> None:
    """Trace what ``ACK(n)`` acks: each unacked INVALIDATE up to ``n``, per mirror."""
    box = svc.invalidator.courier.boxes.get(session)
    for number, chunks, _ in box.unacked if box is not None else ():
        if number > n:
            break
        tracer.acked(session, number, chunks)


def on_sync_range(svc: Services, r: Request) -> None:
    """The target's own sync_cpu_device_pagetables: invalidate now, answer after every ack."""
    identity, session, env = r.identity, r.session, r.env
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
    mms = [mm for mm in svc.registry.mms.values() if mm.pid == msg.pid and not mm.released]
    authz.authorize_sync_range(svc, session, msg.pid, watched=bool(mms))
    if not mms:
        try:
            started_at = start_time(msg.pid)
        except ProcessLookupError as exc:
            raise RequestError(ErrorCode.ESRCH, f"no process {msg.pid}") from exc
        # Its mirrors are another hmmd's: answering OK here would leave them unsynced.
        owners = svc.registry.owners
        owner = owners.owner_of(msg.pid, started_at) if owners is not None else None
        if owner is not None:
            raise Moved(msg.pid, owner)
    ranges = whole_pages(msg.ranges)
    started = [svc.invalidator.begin(mm, ranges, event) for mm in mms]
    pending = [inv for inv in started if not inv.finished]

    def answer() -> None:
        """Every invalidation is complete: OK, or INCOMPLETE for a strict caller."""
        gone = [who for inv in started for who in inv.not_acked]
        if msg.strict and gone:
            text = f"invalidated, but not acked by {', '.join(gone)} (evicted or gone)"
            svc.reject(identity, ErrorCode.INCOMPLETE, text[:1024], env.id, env.type, bad=False)
        else:
            svc.send(identity, Ok(), re=env.id)

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
    Trace: (on_trace, False),
    Register: (on_register, True),
    Unregister: (on_unregister, True),
    Ack: (on_ack, True),
    Fault: (on_fault, True),
    DmaRead: (on_dma_read, True),
    DmaWrite: (on_dma_write, True),
    DmaAtomic: (on_dma_atomic, True),
    SyncRange: (on_sync_range, True),
    WindowOpen: (on_window_open, True),
    DmaReadInto: (on_dma_read_into, True),
    DmaWriteFrom: (on_dma_write_from, True),
}
