"""Operations messages: STATUS and INVENTORY, which need no session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hmmirror.proto.messages.base import Message
from hmmirror.proto.messages.limits import MIRROR_COLUMNS, MM_COLUMNS
from hmmirror.proto.schema import Kind, wire


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
