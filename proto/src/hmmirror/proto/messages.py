"""Every hmmirror message, one frozen dataclass per type.

A message class's docstring is its wire documentation: who sends it, what it
answers or is answered by, its fields and units, and its bulk frames. Field
kinds and bounds are declared with ``wire(...)`` and enforced by the codec.

Addresses are byte addresses in the target's virtual address space; ``start``
values and lengths are multiples of 4096 unless stated otherwise. ``npages``
counts 4 KiB pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar

from hmmirror.proto.schema import Kind, wire

U32_MAX = (1 << 32) - 1

#: The largest range one FAULT may cover: 1 GiB of 4 KiB pages (2 MiB of entries).
MAX_FAULT_PAGES = 1 << 18
#: The largest DMA one request may move: 4 MiB (1024 pages).
MAX_DMA_PAGES = 1024
#: Intervals per REGISTER.
MAX_INTERVALS = 64
#: Pages one mirror may cover in all (256 GiB): the daemon keeps a shadow entry per page.
MAX_MIRROR_PAGES = 1 << 26
#: Items per INVALIDATE batch.
MAX_ITEMS = 4096
#: The largest frame a peer may send (ZeroMQ ``MAXMSGSIZE``): a full DMA plus headroom.
MAX_FRAME = MAX_DMA_PAGES * 4096 + 65536
#: The largest RDMA READ or WRITE one request may move (the device's ``max_msg_sz``).
MAX_RDMA_BYTES = MAX_DMA_PAGES * 4096
#: Columns of ``stat_mr_reply`` rows, in order (the counters are ``rdma stat mr``'s).
STAT_MR_COLUMNS = (
    "mrn", "rkey", "pid", "addr", "length", "access",
    "page_faults", "page_faults_handled", "page_invalidations",
    "page_invalidations_handled", "page_prefetch",
)  # fmt: skip
#: Highest user-space address on x86-64 with 4-level paging, plus one page.
USER_ADDR_END = 1 << 47
NAME_MAX = 64
#: ``welcome.frames``: entries carry physical frame numbers, or opaque frame tokens.
FRAMES_PHYSICAL = "physical"
FRAMES_TOKEN = "token"


class Access(IntFlag):
    """What a mirror may do to the target's memory."""

    READ = 1
    WRITE = 2


class Event(IntEnum):
    """Why a range is invalidated: ``mmu_notifier_event`` values, plus EVICT."""

    UNMAP = 0
    CLEAR = 1
    PROTECTION_VMA = 2
    PROTECTION_PAGE = 3
    SOFT_DIRTY = 4
    RELEASE = 5
    MIGRATE = 6
    EXCLUSIVE = 7
    EVICT = 8
    WRITTEN = 9
    """The target wrote these pages (written-page tracking; only subscribed mirrors get it)."""


class FaultMode(IntEnum):
    """How FAULT treats pages that are not present."""

    SNAPSHOT = 0
    """Report what is there; fault nothing in (``default_flags = 0``)."""
    POPULATE = 1
    """Fault missing pages in first (``HMM_PFN_REQ_FAULT``)."""
    PRESENT = 2
    """Map the pages already present, faulting nothing in: what SNAPSHOT reports, but
    handed out like POPULATE's entries, so the agent may install them (mlx5's
    ``MLX5_PF_FLAGS_SNAPSHOT``, used by PREFETCH_NO_FAULT and ODP registration)."""


class AtomicOp(IntEnum):
    """An 8-byte device atomic (``IBV_WR_ATOMIC_*``)."""

    CMP_SWAP = 0
    """If the value equals ``compare_add``, store ``swap``; return the old value."""
    FETCH_ADD = 1
    """Add ``compare_add`` modulo 2^64; return the old value."""


@dataclass(frozen=True)
class Message:
    """Base of all messages. ``TYPE`` is the header ``type`` string."""

    TYPE: ClassVar[str] = ""
    #: Names of the raw frames that follow the body, in order.
    BULK: ClassVar[tuple[str, ...]] = ()

    def bulk_sizes(self) -> tuple[int, ...]:
        """The exact byte length each bulk frame must have."""
        return ()


# --- sessions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello(Message):
    """Agent → daemon: open a session. Answered by ``welcome``.

    ``agent`` is a human-readable name for logs and ``hmmctl``; ``pid`` the
    agent's process id, for the operator's eyes only. Sending ``hello`` again on
    the same connection opens a fresh session and drops the old one's mirrors.
    """

    TYPE: ClassVar[str] = "hello"
    agent: str = wire(Kind.STR, NAME_MAX)
    pid: int = wire(Kind.UINT, U32_MAX, default=0)


@dataclass(frozen=True)
class Welcome(Message):
    """Daemon → agent, answering ``hello``.

    ``epoch`` is random per daemon start (16 hex digits): a new value means the
    daemon restarted and every translation is void. The agent sends
    ``heartbeat`` every ``heartbeat_ms``; after ``lease_ms`` without one the
    daemon drops the session. An INVALIDATE not acked within ``ack_deadline_ms``
    evicts the mirror. ``frames`` says what the PFN field of this session's
    entries holds: ``"physical"`` (PFNs: a root agent over ipc, or a
    ``frames = "physical"`` grant) or ``"token"`` (opaque frame tokens, equal
    exactly when the pages are). ``zero_pfn`` is the kernel's shared zero page
    in the same terms, its PFN or its token (0 if unknown), so agents can tell
    ZERO pages apart as dmirror does.
    """

    TYPE: ClassVar[str] = "welcome"
    session: int = wire(Kind.UINT)
    epoch: str = wire(Kind.STR, 32)
    heartbeat_ms: int = wire(Kind.UINT, U32_MAX)
    lease_ms: int = wire(Kind.UINT, U32_MAX)
    ack_deadline_ms: int = wire(Kind.UINT, U32_MAX)
    zero_pfn: int = wire(Kind.UINT)
    max_fault_pages: int = wire(Kind.UINT, U32_MAX)
    max_dma_pages: int = wire(Kind.UINT, U32_MAX)
    frames: str = wire(Kind.STR, 16, default=FRAMES_PHYSICAL)


@dataclass(frozen=True)
class Heartbeat(Message):
    """Agent → daemon: renew the lease. Answered by ``heartbeat_ack``."""

    TYPE: ClassVar[str] = "heartbeat"


@dataclass(frozen=True)
class HeartbeatAck(Message):
    """Daemon → agent, answering ``heartbeat``; ``epoch`` as in ``welcome``."""

    TYPE: ClassVar[str] = "heartbeat_ack"
    epoch: str = wire(Kind.STR, 32)


@dataclass(frozen=True)
class Goodbye(Message):
    """Agent → daemon: close the session and drop its mirrors. Answered by ``ok``."""

    TYPE: ClassVar[str] = "goodbye"


@dataclass(frozen=True)
class Ok(Message):
    """Daemon → agent: the request named by the header's ``re`` succeeded."""

    TYPE: ClassVar[str] = "ok"


@dataclass(frozen=True)
class Error(Message):
    """Either direction: the request named by the header's ``re`` failed.

    ``code`` is an ``ErrorCode``; ``message`` says what failed, for whom and why.
    ``re`` is 0 when the failing message could not be decoded far enough to name.
    """

    TYPE: ClassVar[str] = "error"
    code: int = wire(Kind.UINT, 65535)
    message: str = wire(Kind.STR, 1024)


# --- mirrors --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Register(Message):
    """Agent → daemon: mirror ``intervals`` of process ``pid``. Answered by ``registered``.

    ``start_time`` is the target's start time in clock ticks since boot (field
    22 of ``/proc/PID/stat``); 0 means "whatever process has this pid now". The
    daemon refuses a mismatch with ESRCH, so a reused pid is never mirrored by
    mistake. ``access`` is an ``Access`` bit set. Intervals are page-aligned,
    non-empty, below 2^47 and at most 64 of them. ``watch_writes`` subscribes the
    mirror to WRITTEN invalidations of the pages the target writes (for agents
    that cache data, not only translations); it needs the target's userfaultfd.
    ``strict_writes`` goes further: a write to a page the mirror holds blocks the
    writing thread until the mirrors have acked the WRITTEN invalidation (it
    needs a second, "strict" userfaultfd from the target).
    """

    TYPE: ClassVar[str] = "register"
    pid: int = wire(Kind.UINT, U32_MAX)
    start_time: int = wire(Kind.UINT)
    intervals: tuple[tuple[int, int], ...] = wire(Kind.INTERVALS, MAX_INTERVALS)
    access: int = wire(Kind.UINT, 3)
    watch_writes: bool = wire(Kind.BOOL, default=False)
    strict_writes: bool = wire(Kind.BOOL, default=False)


@dataclass(frozen=True)
class Registered(Message):
    """Daemon → agent, answering ``register``.

    ``mirror`` is the new mirror's id, unique within the daemon's epoch.
    ``start_time`` is the identity the daemon bound (see ``register``). ``seq``
    is the mm's current sequence number (even when no invalidation is active).
    """

    TYPE: ClassVar[str] = "registered"
    mirror: int = wire(Kind.UINT)
    pid: int = wire(Kind.UINT, U32_MAX)
    start_time: int = wire(Kind.UINT)
    seq: int = wire(Kind.UINT)


@dataclass(frozen=True)
class Unregister(Message):
    """Agent → daemon: drop ``mirror``. Answered by ``ok``."""

    TYPE: ClassVar[str] = "unregister"
    mirror: int = wire(Kind.UINT)


@dataclass(frozen=True)
class Fault(Message):
    """Agent → daemon: ``hmm_range_fault`` over ``npages`` pages at ``start``.

    Answered by ``fault_reply``, or by ``error`` with EFAULT (no VMA or an
    unreadable one, in POPULATE mode), EPERM (``write`` on a VMA without write
    permission, or a mirror without WRITE access), EBUSY (invalidations kept
    racing the fault for 1000 ms) or EINVAL (outside the mirror). ``mode`` is a
    ``FaultMode``. The range lies inside one of the mirror's intervals.

    ``read`` asks the daemon to also read the pages through the entries it hands
    out, in the same trip (a POPULATE fault of at most ``max_dma_pages``): the
    answer is then ``fault_read_reply``, or a plain ``fault_reply`` when the read
    could not be done (the agent then reads as usual).
    """

    TYPE: ClassVar[str] = "fault"
    mirror: int = wire(Kind.UINT)
    start: int = wire(Kind.UINT)
    npages: int = wire(Kind.UINT, MAX_FAULT_PAGES)
    write: bool = wire(Kind.BOOL)
    mode: int = wire(Kind.UINT, 2)
    read: bool = wire(Kind.BOOL, default=False)


@dataclass(frozen=True)
class FaultReply(Message):
    """Daemon → agent, answering ``fault``.

    Bulk frame ``entries``: ``npages`` little-endian u64 ``hmm_pfn`` values.
    ``seq`` is the mm's (even) sequence number when the entries were read. The
    agent installs them only if no INVALIDATE for this mirror arrived since it
    sent the FAULT (``mmu_interval_read_retry``); otherwise it faults again.
    """

    TYPE: ClassVar[str] = "fault_reply"
    BULK: ClassVar[tuple[str, ...]] = ("entries",)
    mirror: int = wire(Kind.UINT)
    start: int = wire(Kind.UINT)
    npages: int = wire(Kind.UINT, MAX_FAULT_PAGES)
    seq: int = wire(Kind.UINT)

    def bulk_sizes(self) -> tuple[int, ...]:
        """One entry frame of ``npages * 8`` bytes."""
        return (self.npages * 8,)


@dataclass(frozen=True)
class FaultReadReply(Message):
    """Daemon → agent, answering a ``fault`` with ``read``: the entries and the data.

    Bulk frames ``entries`` (``npages`` u64, as ``fault_reply``) and ``data``
    (``npages * 4096`` bytes), read through those entries and checked against
    the live page table before and after the copy, as ``dma_read`` is. The
    agent installs the entries under the same rule as ``fault_reply``; if it may
    not, it discards the data too and faults again.
    """

    TYPE: ClassVar[str] = "fault_read_reply"
    BULK: ClassVar[tuple[str, ...]] = ("entries", "data")
    mirror: int = wire(Kind.UINT)
    start: int = wire(Kind.UINT)
    npages: int = wire(Kind.UINT, MAX_DMA_PAGES)
    seq: int = wire(Kind.UINT)

    def bulk_sizes(self) -> tuple[int, ...]:
        """An entry frame of ``npages * 8`` bytes, then ``npages * 4096`` bytes of data."""
        return (self.npages * 8, self.npages * 4096)


# --- invalidation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Invalidate(Message):
    """Daemon → agent: zap these ranges of ``mirror``, fence in-flight DMA, then ``ack``.

    ``n`` is this connection's message number: it grows by one per INVALIDATE
    the daemon sends on the session. Each item is ``[seq, start, end, event]``:
    the mm's odd ``seq`` to record with ``set_seq``, the byte range [start, end)
    and an ``Event``; each item is one invalidation. RELEASE and EVICT items
    cover the whole mirror.
    """

    TYPE: ClassVar[str] = "invalidate"
    n: int = wire(Kind.UINT)
    mirror: int = wire(Kind.UINT)
    items: tuple[tuple[int, int, int, int], ...] = wire(Kind.ITEMS, MAX_ITEMS)


@dataclass(frozen=True)
class Ack(Message):
    """Agent → daemon: every INVALIDATE numbered up to ``n`` is done (cumulative).

    Send it only after every item up to ``n`` was zapped and no DMA of the agent
    still uses the zapped pages. Acks need no reply.
    """

    TYPE: ClassVar[str] = "ack"
    n: int = wire(Kind.UINT)


@dataclass(frozen=True)
class Evicted(Message):
    """Daemon → agent: the session was fenced; these mirrors are gone.

    Sent best-effort when the agent missed an ack deadline or its lease. Every
    later request other than ``hello`` gets FENCED. The agent drops all its
    entries and says ``hello`` again.
    """

    TYPE: ClassVar[str] = "evicted"
    mirrors: tuple[int, ...] = wire(Kind.UINTS, 4096)
    reason: str = wire(Kind.STR, 256)


@dataclass(frozen=True)
class SyncRange(Message):
    """Agent or target → daemon: invalidate ``ranges`` of process ``pid`` now.

    ``ranges`` is a list of at most 4096 [start, end) pairs, each counted as one
    invalidation. The daemon invalidates them with ``event`` (an ``Event``)
    exactly as if its watcher had seen the changes, and answers ``ok`` only once
    every mirror overlapping any of them has acked or been evicted. This is
    ``sync_cpu_device_pagetables`` made literal: a target that calls it before
    changing its memory gets the kernel's invalidate-before-change order.
    Clients coalesce concurrent calls into one message. Answered by ``ok``, or
    ``error`` (ESRCH for an unknown process, EINVAL). With ``strict`` (the
    target's own sync call), a mirror evicted instead of acking makes the answer
    ``error`` INCOMPLETE, naming who: the range is still invalidated.
    """

    TYPE: ClassVar[str] = "sync_range"
    pid: int = wire(Kind.UINT, U32_MAX)
    ranges: tuple[tuple[int, int], ...] = wire(Kind.INTERVALS, MAX_ITEMS)
    event: int = wire(Kind.UINT, 255)
    strict: bool = wire(Kind.BOOL, default=False)


# --- device access --------------------------------------------------------------------------


@dataclass(frozen=True)
class DmaRead(Message):
    """Agent → daemon: read ``npages`` pages at ``start`` through translations ``entries``.

    Bulk frame ``entries``: the ``npages`` u64 entries the agent translated with,
    all VALID. The daemon compares them with the live page table before and after
    the copy; a mismatch, or a pending INVALIDATE of the range, gets STALE and the
    data is discarded. Answered by ``dma_read_reply`` or ``error`` (STALE, EFAULT).
    """

    TYPE: ClassVar[str] = "dma_read"
    BULK: ClassVar[tuple[str, ...]] = ("entries",)
    mirror: int = wire(Kind.UINT)
    start: int = wire(Kind.UINT)
    npages: int = wire(Kind.UINT, MAX_DMA_PAGES)

    def bulk_sizes(self) -> tuple[int, ...]:
        """One entry frame of ``npages * 8`` bytes."""
        return (self.npages * 8,)


@dataclass(frozen=True)
class DmaReadReply(Message):
    """Daemon → agent, answering ``dma_read``. Bulk frame ``data``: ``npages * 4096`` bytes."""

    TYPE: ClassVar[str] = "dma_read_reply"
    BULK: ClassVar[tuple[str, ...]] = ("data",)
    mirror: int = wire(Kind.UINT)
    start: int = wire(Kind.UINT)
    npages: int = wire(Kind.UINT, MAX_DMA_PAGES)

    def bulk_sizes(self) -> tuple[int, ...]:
        """One data frame of ``npages * 4096`` bytes."""
        return (self.npages * 4096,)


@dataclass(frozen=True)
class DmaWrite(Message):
    """Agent → daemon: write ``data`` into the ``npages`` pages at ``start`` through ``entries``.

    The data lands at byte ``offset`` of the first page and is ``length`` bytes
    long (0 means ``npages * 4096``); the pages are exactly those the bytes touch,
    so a device write of a few bytes never rewrites the rest of the page. Bulk
    frames ``entries`` (``npages`` u64, all VALID|WRITE) and ``data``. Checked
    like ``dma_read`` before the copy. Answered by ``ok`` or ``error`` (STALE,
    EPERM for a read-only page, EFAULT, EINVAL for bytes that do not fit the pages).
    """

    TYPE: ClassVar[str] = "dma_write"
    BULK: ClassVar[tuple[str, ...]] = ("entries", "data")
    mirror: int = wire(Kind.UINT)
    start: int = wire(Kind.UINT)
    npages: int = wire(Kind.UINT, MAX_DMA_PAGES)
    offset: int = wire(Kind.UINT, 4095, default=0)
    length: int = wire(Kind.UINT, MAX_DMA_PAGES * 4096, default=0)

    def bulk_sizes(self) -> tuple[int, ...]:
        """An entry frame of ``npages * 8`` bytes, then the data."""
        return (self.npages * 8, self.length or self.npages * 4096)


@dataclass(frozen=True)
class DmaAtomic(Message):
    """Agent → daemon: an 8-byte atomic at ``start + offset`` through one entry.

    ``op`` is an ``AtomicOp``; ``offset`` is 8-byte aligned. Bulk frame
    ``entries``: the page's one u64 entry, VALID|WRITE. Checked like
    ``dma_write``. The daemon performs read, compute and write with nothing in
    between, so atomics through one daemon are atomic with respect to each other
    (``IBV_ATOMIC_HCA``), not with respect to the target's own CPU accesses.
    Answered by ``atomic_reply`` or ``error`` (STALE, EPERM, EFAULT, EINVAL).
    """

    TYPE: ClassVar[str] = "dma_atomic"
    BULK: ClassVar[tuple[str, ...]] = ("entries",)
    mirror: int = wire(Kind.UINT)
    start: int = wire(Kind.UINT)
    offset: int = wire(Kind.UINT, 4088)
    op: int = wire(Kind.UINT, 1)
    compare_add: int = wire(Kind.UINT)
    swap: int = wire(Kind.UINT, default=0)

    def bulk_sizes(self) -> tuple[int, ...]:
        """One entry frame of 8 bytes."""
        return (8,)


@dataclass(frozen=True)
class AtomicReply(Message):
    """Answers ``dma_atomic`` (daemon → agent) and ``rdma_atomic`` (agent → requester).

    ``old`` is the 8-byte little-endian value found before the operation.
    """

    TYPE: ClassVar[str] = "atomic_reply"
    old: int = wire(Kind.UINT)


# --- the RDMA service (requester ↔ hm-agent) ----------------------------------------------


@dataclass(frozen=True)
class RdmaRead(Message):
    """Requester → agent: RDMA READ of ``length`` bytes at virtual address ``addr`` of ``rkey``.

    Any byte alignment. Answered by ``rdma_read_reply``, or ``error`` with
    REMOTE_ACCESS (unknown rkey, outside the MR, no REMOTE_READ), EFAULT (an
    unmapped page), EBUSY or ESRCH. ``rkey`` is a u64 mkey (in hm-agent a 24-bit
    index and 40 secret random bits); an MR the requester holds no grant on
    answers REMOTE_ACCESS exactly as an unknown rkey does.
    """

    TYPE: ClassVar[str] = "rdma_read"
    rkey: int = wire(Kind.UINT)
    addr: int = wire(Kind.UINT)
    length: int = wire(Kind.UINT, MAX_RDMA_BYTES)


@dataclass(frozen=True)
class RdmaReadReply(Message):
    """Agent → requester, answering ``rdma_read``. Bulk frame ``data``: ``length`` bytes."""

    TYPE: ClassVar[str] = "rdma_read_reply"
    BULK: ClassVar[tuple[str, ...]] = ("data",)
    length: int = wire(Kind.UINT, MAX_RDMA_BYTES)

    def bulk_sizes(self) -> tuple[int, ...]:
        """One data frame of ``length`` bytes."""
        return (self.length,)


@dataclass(frozen=True)
class RdmaWrite(Message):
    """Requester → agent: RDMA WRITE of the bulk frame ``data`` at ``addr`` of ``rkey``.

    Answered by ``ok``, or ``error`` with REMOTE_ACCESS (unknown rkey, outside
    the MR, no REMOTE_WRITE), EPERM (a page the target maps read-only), EFAULT
    (an unmapped page), EBUSY or ESRCH.
    """

    TYPE: ClassVar[str] = "rdma_write"
    BULK: ClassVar[tuple[str, ...]] = ("data",)
    rkey: int = wire(Kind.UINT)
    addr: int = wire(Kind.UINT)
    length: int = wire(Kind.UINT, MAX_RDMA_BYTES)

    def bulk_sizes(self) -> tuple[int, ...]:
        """One data frame of ``length`` bytes."""
        return (self.length,)


@dataclass(frozen=True)
class RdmaAtomic(Message):
    """Requester → agent: an 8-byte atomic (``AtomicOp``) at 8-aligned ``addr`` of ``rkey``.

    Answered by ``atomic_reply``, or ``error`` with REMOTE_ACCESS (unknown
    rkey, outside the MR, no REMOTE_ATOMIC), EINVAL (unaligned), EPERM, EFAULT.
    """

    TYPE: ClassVar[str] = "rdma_atomic"
    rkey: int = wire(Kind.UINT)
    addr: int = wire(Kind.UINT)
    op: int = wire(Kind.UINT, 1)
    compare_add: int = wire(Kind.UINT)
    swap: int = wire(Kind.UINT, default=0)


@dataclass(frozen=True)
class StatMr(Message):
    """Authenticated requester → agent: list its MRs and their ODP counters.

    Answered by ``stat_mr_reply`` with the MRs granted to the requester (none
    for a requester without a grant), or ``error`` PERMISSION_DENIED for an
    unauthenticated one (a plain-TCP ``insecure`` listener's peers).
    """

    TYPE: ClassVar[str] = "stat_mr"


@dataclass(frozen=True)
class StatMrReply(Message):
    """Agent → requester: ``device`` and one row per MR, flattened into ``rows``.

    Each row has the ``STAT_MR_COLUMNS`` in order; ``addr`` and ``length`` are 0
    for an implicit (whole address space) MR, whose ``access`` has ON_DEMAND.
    Counter units are those of ``rdma stat mr``: pages, except the two
    ``*_handled`` counters, which count events.
    """

    TYPE: ClassVar[str] = "stat_mr_reply"
    device: str = wire(Kind.STR, NAME_MAX)
    rows: tuple[int, ...] = wire(Kind.UINTS, 4096 * len(STAT_MR_COLUMNS))


# --- operations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Status(Message):
    """Anyone → daemon: report state, no session needed. Answered by ``status_reply``."""

    TYPE: ClassVar[str] = "status"


@dataclass(frozen=True)
class StatusReply(Message):
    """Daemon → requester: ``stats`` maps names to numbers or short strings.

    Keys include ``epoch``, ``uptime_s``, ``sessions``, ``mms``, ``mirrors``,
    ``invalidations``, ``evictions``, ``faults``, ``dma_reads``, ``dma_writes``,
    ``stale``, ``bad_messages``, ``ack_p50_us``, ``ack_p99_us`` and ``ack_p999_us``.
    """

    TYPE: ClassVar[str] = "status_reply"
    stats: dict[str, int | float | str] = wire(Kind.STATS, 256)


#: Columns of ``inventory_reply.mms`` rows, in order (``uffd``: 0 none, 1 events, 2 also strict).
MM_COLUMNS = ("pid", "start_time", "seq", "active", "mirrors", "uffd")
#: Columns of ``inventory_reply.mirrors`` rows, in order (``flags``: 1 watch_writes, 2 strict).
MIRROR_COLUMNS = ("mirror", "session", "pid", "lo", "hi", "held_pages", "access", "flags")


@dataclass(frozen=True)
class Inventory(Message):
    """Anyone → daemon: list mms, mirrors and sessions. Answered by ``inventory_reply``."""

    TYPE: ClassVar[str] = "inventory"


@dataclass(frozen=True)
class InventoryReply(Message):
    """Daemon → requester: one row per mm and per mirror, flattened (``MM_COLUMNS``,
    ``MIRROR_COLUMNS``); ``sessions`` maps session ids (as strings) to agent names.
    At most 4096 rows of each are listed."""

    TYPE: ClassVar[str] = "inventory_reply"
    mms: tuple[int, ...] = wire(Kind.UINTS, 4096 * len(MM_COLUMNS))
    mirrors: tuple[int, ...] = wire(Kind.UINTS, 4096 * len(MIRROR_COLUMNS))
    sessions: dict[str, int | float | str] = wire(Kind.STATS, 256)


ALL_MESSAGES: tuple[type[Message], ...] = (
    Hello, Welcome, Heartbeat, HeartbeatAck, Goodbye, Ok, Error,
    Register, Registered, Unregister, Fault, FaultReply, FaultReadReply,
    Invalidate, Ack, Evicted, SyncRange, DmaRead, DmaReadReply, DmaWrite,
    DmaAtomic, AtomicReply, Status, StatusReply, Inventory, InventoryReply,
    RdmaRead, RdmaReadReply, RdmaWrite, RdmaAtomic, StatMr, StatMrReply,
)  # fmt: skip

#: The explicit type table: the only way a wire string becomes a class.
TYPES: dict[str, type[Message]] = {cls.TYPE: cls for cls in ALL_MESSAGES}
