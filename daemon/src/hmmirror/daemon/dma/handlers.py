"""The DMA path's handlers: device reads, writes and atomics through an agent's translations.

Each request names the mirror, the range and the entries the agent translated
with; the handler checks the mirror covers the range (and has WRITE access for
a write), reserves the reply's room, and hands the access to
``dma.service.DmaService``, which checks the entries against the live page
table (STALE on a mismatch or a pending INVALIDATE) and answers through the
callbacks given here.
"""

from __future__ import annotations

from collections.abc import Callable

from hmmirror.daemon import authz
from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.linux.procfs import PAGE_SHIFT, PAGE_SIZE
from hmmirror.daemon.request import Request, Services, aligned_range
from hmmirror.daemon.state import Mirror, Session
from hmmirror.proto.codec import Envelope
from hmmirror.proto.entries import Entries, from_wire
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import (
    Access,
    AtomicOp,
    AtomicReply,
    DmaAtomic,
    DmaRead,
    DmaReadInto,
    DmaReadReply,
    DmaWrite,
    DmaWriteFrom,
    Ok,
    WindowOpen,
    WindowTicket,
)
from hmmirror.proto.version import WINDOW_VERSION


def _failer(
    svc: Services, identity: bytes, env: Envelope, reserved: int = 0
) -> Callable[[Exception], None]:
    """What answers a request whose copy failed: its typed error reply (and the reply bytes
    it had set aside given back)."""

    def fail(exc: Exception) -> None:
        svc.budget.unreserve(identity, reserved)
        svc.answer_failure(identity, env, exc)

    return fail


def _from_agent(svc: Services, session: Session, frame: bytes | memoryview, npages: int) -> Entries:
    """The entries a DMA request names, with the PFNs hmmd compares against the pagemap:
    a session without physical frames names pages by their tokens."""
    entries = from_wire(frame, npages)
    return entries if session.physical_frames else svc.frames.physical(entries)


def _named(
    svc: Services,
    session: Session,
    mirror: Mirror,
    frame: bytes | memoryview,
    start: int,
    npages: int,
) -> tuple[Entries, bool]:
    """The entries a DMA request names (``_from_agent``), and whether an INVALIDATE of its
    range is still pending: what every DMA's pre-copy check compares."""
    end = start + (npages << PAGE_SHIFT)
    return _from_agent(svc, session, frame, npages), svc.invalidator.pending_for(mirror, start, end)


def _dma_target(svc: Services, session: Session, mirror_id: int, start: int, npages: int) -> Mirror:
    """The live mirror a DMA names, checked to cover the page-aligned range."""
    mirror = svc.registry.mirror_of(session, mirror_id)
    end = aligned_range(start, npages, "DMA")
    if mirror.span_for(start, end) is None:
        raise RequestError(
            ErrorCode.EINVAL, f"DMA [{start:#x}, {end:#x}) is outside mirror {mirror.id}"
        )
    return mirror


def _writable_dma_target(
    svc: Services, session: Session, mirror_id: int, start: int, npages: int
) -> Mirror:
    """Like ``_dma_target``, and the mirror must have been registered with WRITE access."""
    mirror = _dma_target(svc, session, mirror_id, start, npages)
    if not mirror.access & Access.WRITE:
        raise RequestError(
            ErrorCode.EPERM, f"mirror {mirror.id} was registered without WRITE access"
        )
    return mirror


def on_dma_read(svc: Services, r: Request) -> None:
    """A device read through the agent's translations."""
    identity, session, env = r.identity, r.session, r.env
    msg = env.msg
    assert isinstance(msg, DmaRead) and session is not None
    mirror = _dma_target(svc, session, msg.mirror, msg.start, msg.npages)
    # Room for the data first: a peer that does not read gets EBUSY, and no buffer.
    reserved = svc.reserve(identity, msg.npages << PAGE_SHIFT, "dma_read")
    svc.counters["dma_reads"] += 1
    entries, pending = _named(svc, session, mirror, env.bulk[0], msg.start, msg.npages)

    def reply(data: object) -> None:
        answer = DmaReadReply(mirror=mirror.id, start=msg.start, npages=msg.npages)
        svc.send(identity, answer, re=env.id, bulk=[data], copy=False, reserved=reserved)

    try:
        svc.dma.read(
            mirror.mm, msg.start, msg.npages, entries, pending, reply,
            _failer(svc, identity, env, reserved),
        )  # fmt: skip
    except BaseException:
        svc.budget.unreserve(identity, reserved)
        raise


def _check_span(npages: int, offset: int, length: int) -> None:
    """EINVAL unless ``length`` bytes at ``offset`` of the first page touch exactly
    ``npages`` pages (a device write never rewrites the rest of a page)."""
    if not (npages - 1) << PAGE_SHIFT < offset + length <= npages << PAGE_SHIFT:
        raise RequestError(
            ErrorCode.EINVAL,
            f"DMA write of {length} bytes at offset {offset} does not span exactly {npages} pages",
        )


def on_dma_write(svc: Services, r: Request) -> None:
    """A device write through the agent's translations."""
    identity, session, env = r.identity, r.session, r.env
    msg = env.msg
    assert isinstance(msg, DmaWrite) and session is not None
    mirror = _writable_dma_target(svc, session, msg.mirror, msg.start, msg.npages)
    _check_span(msg.npages, msg.offset, msg.length or msg.npages << PAGE_SHIFT)
    svc.counters["dma_writes"] += 1
    entries, pending = _named(svc, session, mirror, env.bulk[0], msg.start, msg.npages)
    end = msg.start + (msg.npages << PAGE_SHIFT)
    svc.dma.write(
        mirror.mm, msg.start, msg.npages, entries, env.bulk[1], pending, msg.offset,
        svc.device_write(mirror.mm, msg.start, end),
        lambda: svc.send(identity, Ok(), re=env.id), _failer(svc, identity, env),
    )  # fmt: skip


# --- the shared-memory window (SPEC §4.9) --------------------------------------------------------


def on_window_open(svc: Services, r: Request) -> None:
    """A ticket to attach a window (``dma.window.Windows.open`` checks how big, and the caps).

    A session that said hello as 1.0 does not know the message (UNKNOWN_MESSAGE, counted
    as bad input); one that may have no window (tcp://) is refused PERMISSION_DENIED.
    """
    identity, session, env = r.identity, r.session, r.env
    msg = env.msg
    assert isinstance(msg, WindowOpen) and session is not None
    if session.version < WINDOW_VERSION:
        svc.reject(
            identity, ErrorCode.UNKNOWN_MESSAGE,
            f"window_open needs protocol {WINDOW_VERSION[0]}.{WINDOW_VERSION[1]}: this session "
            f"said hello as {session.version[0]}.{session.version[1]}",
            env.id, env.type, bad=True,
        )  # fmt: skip
        return
    if not svc.windows.offer(session):
        authz.refuse(
            svc, session.peer.identity, "window_open",
            "DMA windows are for local agents of an ipc:// hmmd only",
        )  # fmt: skip
    ticket, ttl_ms = svc.windows.open(session, msg.size)
    svc.send(identity, WindowTicket(ticket=ticket, expires_ms=ttl_ms), re=env.id)


def on_dma_read_into(svc: Services, r: Request) -> None:
    """A device read into the session's window: ``dma_read``'s checks, no data on the wire."""
    identity, session, env = r.identity, r.session, r.env
    msg = env.msg
    assert isinstance(msg, DmaReadInto) and session is not None
    mirror = _dma_target(svc, session, msg.mirror, msg.start, msg.npages)
    if msg.offset % PAGE_SIZE:
        raise RequestError(ErrorCode.EINVAL, f"window offset {msg.offset} is not page-aligned")
    into = svc.windows.of(session).view(msg.offset, msg.npages << PAGE_SHIFT)
    svc.counters["dma_reads"] += 1
    svc.windows.reads += 1
    entries, pending = _named(svc, session, mirror, env.bulk[0], msg.start, msg.npages)
    svc.dma.read_into(
        mirror.mm, msg.start, msg.npages, entries, pending, into,
        lambda: svc.send(identity, Ok(), re=env.id), _failer(svc, identity, env),
    )  # fmt: skip


def on_dma_write_from(svc: Services, r: Request) -> None:
    """A device write from the session's window: ``dma_write``'s checks; the data lands at
    byte ``offset % 4096`` of the first page."""
    identity, session, env = r.identity, r.session, r.env
    msg = env.msg
    assert isinstance(msg, DmaWriteFrom) and session is not None
    mirror = _writable_dma_target(svc, session, msg.mirror, msg.start, msg.npages)
    length = msg.length or msg.npages << PAGE_SHIFT
    skip = msg.offset % PAGE_SIZE
    _check_span(msg.npages, skip, length)
    data = svc.windows.of(session).view(msg.offset, length)
    svc.counters["dma_writes"] += 1
    svc.windows.writes += 1
    entries, pending = _named(svc, session, mirror, env.bulk[0], msg.start, msg.npages)
    end = msg.start + (msg.npages << PAGE_SHIFT)
    svc.dma.write(
        mirror.mm, msg.start, msg.npages, entries, data, pending, skip,
        svc.device_write(mirror.mm, msg.start, end),
        lambda: svc.send(identity, Ok(), re=env.id), _failer(svc, identity, env),
    )  # fmt: skip


def on_dma_atomic(svc: Services, r: Request) -> None:
    """An 8-byte device atomic: read, compute and write as one job of the target's worker."""
    identity, session, env = r.identity, r.session, r.env
    msg = env.msg
    assert isinstance(msg, DmaAtomic) and session is not None
    mirror = _writable_dma_target(svc, session, msg.mirror, msg.start, 1)
    if msg.offset % 8:
        raise RequestError(ErrorCode.EINVAL, f"atomic at offset {msg.offset} is not 8-aligned")
    svc.counters["dma_atomics"] += 1
    entries, pending = _named(svc, session, mirror, env.bulk[0], msg.start, 1)
    svc.dma.atomic(
        mirror.mm, msg.start + msg.offset, entries, AtomicOp(msg.op), (msg.compare_add, msg.swap),
        pending, svc.device_write(mirror.mm, msg.start, msg.start + PAGE_SIZE),
        lambda old: svc.send(identity, AtomicReply(old=old), re=env.id),
        _failer(svc, identity, env),
    )  # fmt: skip
