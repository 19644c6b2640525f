"""The FAULT path's handler: hmm_range_fault for an agent, answered with its entries.

The reply's room on the connection is reserved first; the fault is attempted
at once (``fault.service.attempt``) and answered inline when nothing must wait,
else continued as a task (``resolve``). What is handed out is recorded in the
mirror's shadow and sent with no await in between, so an invalidation that
starts later is always sent after the reply (SPEC.md's ordering guarantee; the
outbox enforces it).
"""

from __future__ import annotations

from collections.abc import Awaitable

from hmmirror.daemon.budget import fault_reply_bytes
from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.fault.service import (
    Pending,
    Walked,
    WalkOptions,
    attempt,
    changed_under,
    resolve,
)
from hmmirror.daemon.linux.procfs import PAGE_SHIFT
from hmmirror.daemon.request import Request, Services, aligned_range
from hmmirror.daemon.state import Mirror, Session, Span
from hmmirror.daemon.trace import tracer
from hmmirror.daemon.watch.uffd import guard_handed_out
from hmmirror.proto.codec import Envelope
from hmmirror.proto.entries import Entries
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import (
    MAX_DMA_PAGES,
    Access,
    Fault,
    FaultMode,
    FaultReadReply,
    FaultReply,
)

#: FaultMode by wire value (the schema bounds ``mode``), without an Enum call per fault.
_FAULT_MODES = tuple(FaultMode)


def on_fault(svc: Services, r: Request) -> Awaitable[None] | None:
    """hmm_range_fault for the agent, then the entries as a raw frame.

    A fault that needs no waiting and no faulting-in is answered at once, with
    no task; the others continue in ``_fault_later``.
    """
    identity, session, env = r.identity, r.session, r.env
    msg = env.msg
    assert isinstance(msg, Fault) and session is not None
    mirror = svc.registry.mirror_of(session, msg.mirror)
    end = aligned_range(msg.start, msg.npages, "fault")
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
    reserved = svc.reserve(identity, fault_reply_bytes(msg), "fault")
    svc.counters["faults"] += 1
    if tracer.on:
        tracer.fault(mirror, env.id, msg.start, end, msg.write)
    options = _walk_options(svc, mirror, msg, mode)
    try:
        step = attempt(mirror.mm, msg.start, msg.npages, msg.write, mode, svc.zero_pfn, options)
        if isinstance(step, Pending):
            return _fault_later(svc, identity, env, mirror, span, step, reserved, options)
        _fault_reply(svc, identity, env, mirror, span, step, options, reserved)
    except BaseException:
        svc.budget.unreserve(identity, reserved)
        raise
    return None


def _walk_options(svc: Services, mirror: Mirror, msg: Fault, mode: FaultMode) -> WalkOptions:
    """How the walk makes the entries for this mirror: WRITE only with WRITE access (a
    SNAPSHOT shows the CPU's view whatever the access), frame tokens for a session without
    physical frames, put in as the walk goes unless the fault also reads the pages in its
    trip (the DMA check compares the entries with the pagemap: they stay PFNs until sent)."""
    may_write = mode == FaultMode.SNAPSHOT or bool(mirror.access & Access.WRITE)
    reads = msg.read and mode == FaultMode.POPULATE and msg.npages <= MAX_DMA_PAGES
    physical = mirror.session.physical_frames or reads
    return WalkOptions(may_write, None if physical else svc.frames)


async def _fault_later(
    svc: Services, identity: bytes, env: Envelope, mirror: Mirror, span: Span, first: Pending,
    reserved: int, options: WalkOptions,
) -> None:  # fmt: skip
    """The fault's slow path: wait out invalidations, fault pages in, then reply."""
    msg = env.msg
    assert isinstance(msg, Fault)
    mode = _FAULT_MODES[msg.mode]
    try:
        walked = await resolve(
            mirror.mm, msg.start, msg.npages, msg.write, mode, svc.zero_pfn, svc.copier, first,
            options,
        )  # fmt: skip
        _fault_reply(svc, identity, env, mirror, span, walked, options, reserved)
    except BaseException:
        svc.budget.unreserve(identity, reserved)
        raise


def _fault_reply(
    svc: Services, identity: bytes, env: Envelope, mirror: Mirror, span: Span, walked: Walked,
    options: WalkOptions, reserved: int,
) -> None:  # fmt: skip
    """Record what is handed out and send it (in place of the ``reserved`` bytes); no await
    from the pagemap read to the hand-out, so a later invalidation is always sent after this
    reply. Raises only before anything is sent."""
    msg = env.msg
    assert isinstance(msg, Fault)
    if mirror.dead:
        raise RequestError(ErrorCode.NO_MIRROR, f"mirror {mirror.id} was dropped during the fault")
    entries, tokenized = walked.entries, options.tokens is not None
    if msg.mode != FaultMode.SNAPSHOT:  # POPULATE and PRESENT entries may be installed
        if span.held:
            stale = changed_under(span, msg.start, walked, svc.zero_pfn)
            if stale:  # their INVALIDATE goes out before this reply (the outbox's rule)
                svc.invalidator.announce(mirror.mm, stale)
        span.hand_out(msg.start, walked.shadow, walked.raw)  # both the span's now
        # Before the agent can hold these translations: their VMAs registered with the
        # uffds, and (strict mirror) their pages write-protected.
        guard_handed_out(
            mirror.mm, msg.start, msg.start + (msg.npages << PAGE_SHIFT), mirror.strict
        )
    if msg.read and msg.mode == FaultMode.POPULATE and msg.npages <= MAX_DMA_PAGES:
        # The device's access, done in the fault's own trip and checked like any DMA read
        # (through entries still holding PFNs: see _walk_options). Its copy runs on the
        # target's worker: an invalidation that starts meanwhile goes out before this reply,
        # so the agent discards the reply and faults again.
        def with_data(data: object) -> None:
            svc.counters["dma_reads"] += 1
            _send_fault_reply(svc, identity, env, mirror, entries, tokenized, data, reserved)

        def without(_: Exception) -> None:  # the agent reads, and sees why, itself
            _send_fault_reply(svc, identity, env, mirror, entries, tokenized, None, reserved)

        try:
            svc.dma.read(mirror.mm, msg.start, msg.npages, entries, False, with_data, without)
            return
        except RequestError:
            pass
    _send_fault_reply(svc, identity, env, mirror, entries, tokenized, None, reserved)


def _send_fault_reply(
    svc: Services, identity: bytes, env: Envelope, mirror: Mirror, entries: Entries,
    tokenized: bool, data: object | None, reserved: int,
) -> None:  # fmt: skip
    """FAULT_READ_REPLY with the entries and ``data``, or FAULT_REPLY with the entries only,
    in place of the ``reserved`` reply bytes; ``tokenized``: the entries carry frame tokens
    already."""
    msg = env.msg
    assert isinstance(msg, Fault)
    if mirror.dead:
        svc.budget.unreserve(identity, reserved)
        svc.answer_failure(
            identity,
            env,
            RequestError(ErrorCode.NO_MIRROR, f"mirror {mirror.id} was dropped during the fault"),
        )
        return
    seq = mirror.mm.seq
    if tracer.on:
        tracer.fault_reply(mirror, env.id, msg.start, msg.start + (msg.npages << PAGE_SHIFT), seq)
    if not tokenized:
        _to_agent(svc, mirror.session, entries)
    if data is not None:
        both = FaultReadReply(mirror=mirror.id, start=msg.start, npages=msg.npages, seq=seq)
        svc.send(identity, both, re=env.id, bulk=[entries, data], copy=False, reserved=reserved)
        return
    reply = FaultReply(mirror=mirror.id, start=msg.start, npages=msg.npages, seq=seq)
    # entries is the walk's wire array, which nobody changes now: send its buffer as is.
    svc.send(identity, reply, re=env.id, bulk=[entries], copy=False, reserved=reserved)


def _to_agent(svc: Services, session: Session, entries: Entries) -> None:
    """Make ``entries`` (already recorded as handed out) what the session may see: frame
    tokens in place of PFNs unless it has physical frames. Done in place, last thing."""
    if not session.physical_frames:
        svc.frames.tokenize(entries)
