"""Field kinds and their validators: the schema language of ``messages``.

Each message field declares its kind with ``wire(...)``. The codec checks every
decoded body against these kinds before a message object exists, so handlers
only ever see values of the declared type and range.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

from hmmirror.proto.errors import DecodeError, TooLarge

U64_MAX = (1 << 64) - 1
#: Marks a field without a default: it must be on the wire.
REQUIRED: Any = object()


class Kind(Enum):
    """The value kinds a field may have on the wire."""

    UINT = "uint"
    """An integer in [0, max]; never a bool."""
    BOOL = "bool"
    STR = "str"
    """A UTF-8 string of at most ``max`` characters."""
    INTERVALS = "intervals"
    """A list of at most ``max`` [start, end) pairs of u64, start < end."""
    UINTS = "uints"
    """A list of at most ``max`` u64 values."""
    ITEMS = "items"
    """A list of at most ``max`` invalidation items [mirror, seq, start, end, event]."""
    STATS = "stats"
    """A map of at most ``max`` string keys to numbers or short strings."""


@dataclass(frozen=True)
class Spec:
    """How one field travels: its kind and its bound."""

    kind: Kind
    max: int = U64_MAX
    default: Any = REQUIRED


def wire(kind: Kind, max: int = U64_MAX, default: Any = dataclasses.MISSING) -> Any:
    """Declare a message field of ``kind`` bounded by ``max``; ``default`` makes it optional."""
    spec = Spec(kind, max, REQUIRED if default is dataclasses.MISSING else default)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata={"wire": spec})
    return dataclasses.field(default=default, metadata={"wire": spec})


def _uint(name: str, value: Any, bound: int) -> int:
    if type(value) is not int:
        raise DecodeError(f"field {name!r} must be an unsigned integer, got {type(value).__name__}")
    if value < 0:
        raise DecodeError(f"field {name!r} = {value} is negative")
    if value > bound:
        raise TooLarge(f"field {name!r} = {value} exceeds {bound}")
    return value


def check(name: str, spec: Spec, value: Any) -> Any:
    """Validate one decoded value against ``spec``; return it in its Python form."""
    kind = spec.kind
    if kind is Kind.UINT:
        return _uint(name, value, spec.max)
    if kind is Kind.BOOL:
        if type(value) is not bool:
            raise DecodeError(f"field {name!r} must be a bool")
        return value
    if kind is Kind.STR:
        if type(value) is not str:
            raise DecodeError(f"field {name!r} must be a string")
        if len(value) > spec.max:
            raise TooLarge(f"field {name!r} is longer than {spec.max} characters")
        return value
    if type(value) is not list and type(value) is not tuple and kind is not Kind.STATS:
        raise DecodeError(f"field {name!r} must be a list")
    if kind is Kind.STATS:
        if type(value) is not dict:
            raise DecodeError(f"field {name!r} must be a map")
        if len(value) > spec.max:
            raise TooLarge(f"field {name!r} has more than {spec.max} entries")
        for k, v in value.items():
            if type(k) is not str or len(k) > 64:
                raise DecodeError(f"field {name!r} has a bad key")
            if type(v) not in (int, float, str) or (type(v) is str and len(v) > 256):
                raise DecodeError(f"field {name!r}[{k!r}] has a bad value")
        return dict(value)
    if len(value) > spec.max:
        raise TooLarge(f"field {name!r} has more than {spec.max} elements")
    if kind is Kind.UINTS:
        return tuple(_uint(name, v, U64_MAX) for v in value)
    if kind is Kind.INTERVALS:
        out = []
        for pair in value:
            if type(pair) not in (list, tuple) or len(pair) != 2:
                raise DecodeError(f"field {name!r} must hold [start, end] pairs")
            start, end = (_uint(name, v, U64_MAX) for v in pair)
            if start >= end:
                raise DecodeError(f"field {name!r} has an empty or reversed interval")
            out.append((start, end))
        return tuple(out)
    # Kind.ITEMS
    items = []
    for item in value:
        if type(item) not in (list, tuple) or len(item) != 5:
            raise DecodeError(f"field {name!r} must hold 5-element items")
        items.append(tuple(_uint(name, v, U64_MAX) for v in item))
    return tuple(items)


def to_plain(spec: Spec, value: Any) -> Any:
    """Return ``value`` in the form msgpack should encode."""
    if spec.kind in (Kind.INTERVALS, Kind.ITEMS):
        return [list(v) for v in value]
    if spec.kind is Kind.UINTS:
        return list(value)
    return value
