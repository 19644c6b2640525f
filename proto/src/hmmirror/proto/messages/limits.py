"""Size caps, address bounds and column tables of the messages: pure numbers and names.

Each cap is enforced by the codec (through ``wire(...)`` bounds) or by the receiver, and
appears in SPEC.md §1.3; ``MAX_FRAME`` is also every socket's ``MAXMSGSIZE``.
"""

from __future__ import annotations

#: The largest u32: pids and millisecond durations are u32 on the wire.
U32_MAX = (1 << 32) - 1

#: The largest range one FAULT may cover: 1 GiB of 4 KiB pages (2 MiB of entries).
MAX_FAULT_PAGES = 1 << 18
#: The largest DMA one request may move: 4 MiB (1024 pages).
MAX_DMA_PAGES = 1024
#: The largest shared-memory DMA window one session may attach (SPEC §4.9): 64 MiB.
MAX_WINDOW = 64 << 20
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
#: The longest agent or device name, in characters.
NAME_MAX = 64
#: ``welcome.frames``: entries carry physical frame numbers, or opaque frame tokens.
FRAMES_PHYSICAL = "physical"
FRAMES_TOKEN = "token"
#: Columns of ``inventory_reply.mms`` rows, in order (``uffd``: 0 none, 1 events, 2 also strict).
MM_COLUMNS = ("pid", "start_time", "seq", "active", "mirrors", "uffd")
#: Columns of ``inventory_reply.mirrors`` rows, in order (``flags``: 1 watch_writes, 2 strict).
MIRROR_COLUMNS = ("mirror", "session", "pid", "lo", "hi", "held_pages", "access", "flags")
