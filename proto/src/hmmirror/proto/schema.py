"""Field kinds and their validators: the schema language of ``messages``.

Each message field declares its kind with ``wire(...)``. The codec checks every
decoded body against these kinds before a message object exists, so handlers
only ever see values of the declared type and range. The validators judge what
msgpack decoded (arrays as tuples): msgpack cannot carry an integer above
2^64-1, so the hot paths for u64 lists test only the lower bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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
    """A list of at most ``max`` invalidation items [seq, start, end, event]."""
    STATS = "stats"
    """A map of at most ``max`` string keys to numbers or short strings."""


@dataclass(frozen=True)
class Spec:
    """How one field travels: its kind and its bound."""

    kind: Kind
    max: int = U64_MAX
    default: Any = REQUIRED
    omit_default: bool = False
    """Left out of the encoded body while it holds ``default`` (a field a later minor
    version added: a message that does not use it is encoded as before)."""


def wire(
    kind: Kind, max: int = U64_MAX, default: Any = dataclasses.MISSING, omit_default: bool = False
) -> Any:
    """Declare a message field of ``kind`` bounded by ``max``; ``default`` makes it optional,
    and ``omit_default`` leaves it out of the encoding while it holds the default."""
    spec = Spec(kind, max, REQUIRED if default is dataclasses.MISSING else default, omit_default)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata={"wire": spec})
    return dataclasses.field(default=default, metadata={"wire": spec})


def _uint(name: str, value: Any, bound: int) -> int:
    """Return ``value`` if it is an int in [0, ``bound``]; else raise DecodeError or TooLarge."""
    if type(value) is not int:
        raise DecodeError(f"field {name!r} must be an unsigned integer, got {type(value).__name__}")
    if value < 0:
        raise DecodeError(f"field {name!r} = {value} is negative")
    if value > bound:
        raise TooLarge(f"field {name!r} = {value} exceeds {bound}")
    return value


def _check_uint(name: str, spec: Spec, value: Any) -> int:
    """Validate a UINT field: an int in [0, ``spec.max``], the valid case first."""
    if type(value) is int and 0 <= value <= spec.max:
        return value
    return _uint(name, value, spec.max)


def _check_bool(name: str, spec: Spec, value: Any) -> bool:
    """Validate a BOOL field: a real bool, not an int."""
    if type(value) is not bool:
        raise DecodeError(f"field {name!r} must be a bool")
    return value


def _check_str(name: str, spec: Spec, value: Any) -> str:
    """Validate a STR field: a string of at most ``spec.max`` characters."""
    if type(value) is not str:
        raise DecodeError(f"field {name!r} must be a string")
    if len(value) > spec.max:
        raise TooLarge(f"field {name!r} is longer than {spec.max} characters")
    return value


def _list(name: str, spec: Spec, value: Any) -> list[Any] | tuple[Any, ...]:
    """Return ``value`` if it is a list or tuple of at most ``spec.max`` elements."""
    if type(value) is not list and type(value) is not tuple:
        raise DecodeError(f"field {name!r} must be a list")
    if len(value) > spec.max:
        raise TooLarge(f"field {name!r} has more than {spec.max} elements")
    return value


def _check_stats(name: str, spec: Spec, value: Any) -> dict[str, Any]:
    """Validate a STATS field: a bounded map of short keys to numbers or short strings."""
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


def _check_uints(name: str, spec: Spec, value: Any) -> tuple[int, ...]:
    """Validate a UINTS field: a bounded list of u64 values, returned as a tuple."""
    return tuple(_uint(name, v, U64_MAX) for v in _list(name, spec, value))


def _check_intervals(name: str, spec: Spec, value: Any) -> tuple[tuple[int, int], ...]:
    """Validate an INTERVALS field: a bounded list of [start, end) u64 pairs, start < end."""
    seq = _list(name, spec, value)
    if type(seq) is tuple:
        # The common case (msgpack gives tuples), checked without building anything: a
        # tuple of valid pairs is its own result.
        for pair in seq:
            if type(pair) is tuple and len(pair) == 2:
                start, end = pair
                # msgpack cannot carry an integer above 2^64-1: only the lower bound can fail.
                if type(start) is int and type(end) is int and 0 <= start < end:
                    continue
            break
        else:
            return seq
    out: list[tuple[int, int]] = []
    append = out.append
    for pair in seq:
        if type(pair) not in (list, tuple) or len(pair) != 2:
            raise DecodeError(f"field {name!r} must hold [start, end] pairs")
        start, end = _uint(name, pair[0], U64_MAX), _uint(name, pair[1], U64_MAX)
        if start >= end:
            raise DecodeError(f"field {name!r} has an empty or reversed interval")
        append((start, end))
    return tuple(out)


def _check_items(name: str, spec: Spec, value: Any) -> tuple[tuple[int, ...], ...]:
    """Validate an ITEMS field: a bounded list of 4-element u64 items."""
    seq = _list(name, spec, value)
    if type(seq) is tuple:
        # Agents decode every item of every INVALIDATE: the common case (msgpack gives
        # tuples) is checked inline, without building anything, and is its own result.
        for item in seq:
            if type(item) is tuple and len(item) == 4:
                a, b, c, d = item
                # msgpack cannot carry an integer above 2^64-1: only the lower bound can fail.
                if (
                    type(a) is int and type(b) is int and type(c) is int and type(d) is int
                    and a >= 0 and b >= 0 and c >= 0 and d >= 0
                ):  # fmt: skip
                    continue
            break
        else:
            return seq
    out: list[tuple[int, ...]] = []
    append = out.append
    for item in seq:
        if type(item) not in (list, tuple) or len(item) != 4:
            raise DecodeError(f"field {name!r} must hold 4-element items")
        append(tuple(_uint(name, v, U64_MAX) for v in item))
    return tuple(out)


Validator = Callable[[str, Spec, Any], Any]

#: One validator per kind: the codec compiles each message class into (name, validator, spec).
VALIDATORS: dict[Kind, Validator] = {
    Kind.UINT: _check_uint,
    Kind.BOOL: _check_bool,
    Kind.STR: _check_str,
    Kind.STATS: _check_stats,
    Kind.UINTS: _check_uints,
    Kind.INTERVALS: _check_intervals,
    Kind.ITEMS: _check_items,
}


def check(name: str, spec: Spec, value: Any) -> Any:
    """Validate one decoded value against ``spec``; return it in its Python form."""
    return VALIDATORS[spec.kind](name, spec, value)
