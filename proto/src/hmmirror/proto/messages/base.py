"""The base class of every message: its wire type string and its bulk frames."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Message:
    """Base of all messages. ``TYPE`` is the header ``type`` string."""

    TYPE: ClassVar[str] = ""
    #: Names of the raw frames that follow the body, in order.
    BULK: ClassVar[tuple[str, ...]] = ()

    def bulk_sizes(self) -> tuple[int, ...]:
        """The exact byte length each bulk frame must have."""
        return ()
