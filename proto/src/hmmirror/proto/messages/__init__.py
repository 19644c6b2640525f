"""Every hmmirror message, one frozen dataclass per type, and the table of them all.

A message class's docstring is its wire documentation: who sends it, what it
answers or is answered by, its fields and units, and its bulk frames. Field
kinds and bounds are declared with ``wire(...)`` and enforced by the codec.

Addresses are byte addresses in the target's virtual address space; ``start``
values and lengths are multiples of 4096 unless stated otherwise. ``npages``
counts 4 KiB pages.

The classes live in one module per part of the protocol (``session``,
``mirror``, ``invalidation``, ``dma``, ``rdma``, ``operations``), the caps in
``limits``, the enumerations in ``enums``; every name is re-exported here, and
``TYPES`` below is the one registry of message types.
"""

from __future__ import annotations

from hmmirror.proto.messages.base import Message
from hmmirror.proto.messages.dma import AtomicReply, DmaAtomic, DmaRead, DmaReadReply, DmaWrite
from hmmirror.proto.messages.enums import Access, AtomicOp, Event, FaultMode
from hmmirror.proto.messages.invalidation import Ack, Evicted, Invalidate, SyncRange
from hmmirror.proto.messages.limits import (
    FRAMES_PHYSICAL,
    FRAMES_TOKEN,
    MAX_DMA_PAGES,
    MAX_FAULT_PAGES,
    MAX_FRAME,
    MAX_INTERVALS,
    MAX_ITEMS,
    MAX_MIRROR_PAGES,
    MAX_RDMA_BYTES,
    MAX_WINDOW,
    MIRROR_COLUMNS,
    MM_COLUMNS,
    NAME_MAX,
    STAT_MR_COLUMNS,
    U32_MAX,
    USER_ADDR_END,
)
from hmmirror.proto.messages.mirror import (
    Fault,
    FaultReadReply,
    FaultReply,
    Register,
    Registered,
    Unregister,
)
from hmmirror.proto.messages.operations import Inventory, InventoryReply, Status, StatusReply
from hmmirror.proto.messages.rdma import (
    RdmaAtomic,
    RdmaRead,
    RdmaReadReply,
    RdmaWrite,
    StatMr,
    StatMrReply,
)
from hmmirror.proto.messages.session import (
    Error,
    Goodbye,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Ok,
    Welcome,
)
from hmmirror.proto.messages.trace import (
    MAX_TRACE_EVENTS,
    MAX_TRACE_MS,
    TRACE_COLUMNS,
    Trace,
    TraceKind,
    TraceReply,
)
from hmmirror.proto.messages.window import (
    TICKET_HEX,
    DmaReadInto,
    DmaWriteFrom,
    WindowOpen,
    WindowTicket,
)

ALL_MESSAGES: tuple[type[Message], ...] = (
    Hello, Welcome, Heartbeat, HeartbeatAck, Goodbye, Ok, Error,
    Register, Registered, Unregister, Fault, FaultReply, FaultReadReply,
    Invalidate, Ack, Evicted, SyncRange, DmaRead, DmaReadReply, DmaWrite,
    DmaAtomic, AtomicReply, Status, StatusReply, Inventory, InventoryReply,
    RdmaRead, RdmaReadReply, RdmaWrite, RdmaAtomic, StatMr, StatMrReply,
    Trace, TraceReply, WindowOpen, WindowTicket, DmaReadInto, DmaWriteFrom,
)  # fmt: skip

#: The explicit type table: the only way a wire string becomes a class.
TYPES: dict[str, type[Message]] = {cls.TYPE: cls for cls in ALL_MESSAGES}

__all__ = [
    "ALL_MESSAGES",
    "FRAMES_PHYSICAL",
    "FRAMES_TOKEN",
    "MAX_DMA_PAGES",
    "MAX_FAULT_PAGES",
    "MAX_FRAME",
    "MAX_INTERVALS",
    "MAX_ITEMS",
    "MAX_MIRROR_PAGES",
    "MAX_RDMA_BYTES",
    "MAX_TRACE_EVENTS",
    "MAX_TRACE_MS",
    "MAX_WINDOW",
    "MIRROR_COLUMNS",
    "MM_COLUMNS",
    "NAME_MAX",
    "STAT_MR_COLUMNS",
    "TICKET_HEX",
    "TRACE_COLUMNS",
    "TYPES",
    "U32_MAX",
    "USER_ADDR_END",
    "Access",
    "Ack",
    "AtomicOp",
    "AtomicReply",
    "DmaAtomic",
    "DmaRead",
    "DmaReadInto",
    "DmaReadReply",
    "DmaWrite",
    "DmaWriteFrom",
    "Error",
    "Event",
    "Evicted",
    "Fault",
    "FaultMode",
    "FaultReadReply",
    "FaultReply",
    "Goodbye",
    "Heartbeat",
    "HeartbeatAck",
    "Hello",
    "Invalidate",
    "Inventory",
    "InventoryReply",
    "Message",
    "Ok",
    "RdmaAtomic",
    "RdmaRead",
    "RdmaReadReply",
    "RdmaWrite",
    "Register",
    "Registered",
    "StatMr",
    "StatMrReply",
    "Status",
    "StatusReply",
    "SyncRange",
    "Trace",
    "TraceKind",
    "TraceReply",
    "Unregister",
    "Welcome",
    "WindowOpen",
    "WindowTicket",
]
