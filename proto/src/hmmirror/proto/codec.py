"""Frame layout, encoding and validated decoding of hmmirror messages.

Frames of one message, after the ROUTER's identity frame::

    [b"", header, body, bulk0, bulk1, ...]
    header  msgpack map {"v": [1, 0], "type": "fault", "id": 17, "re": 0}
    body    msgpack map of the message's fields (see ``messages``)
    bulk    raw frames: page entries as little-endian u64, DMA data as bytes

``id`` is chosen by the sender and is unique per sender per session; a reply
carries the request's ``id`` in ``re``. Untrusted bytes are checked in a fixed
order: frame count and sizes, header, version, type (through the ``TYPES``
table), body against the schema, then bulk frame sizes. Nothing is allocated on
a peer's say-so, and nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import msgpack
from hmmirror.proto.errors import (
    DecodeError,
    ProtocolError,
    TooLarge,
    UnknownMessage,
    VersionError,
)
from hmmirror.proto.messages import MAX_FRAME, TYPES, Ack, Invalidate, Message
from hmmirror.proto.schema import REQUIRED, VALIDATORS, Spec, Validator, _check_items
from hmmirror.proto.version import PROTOCOL_VERSION, compatible

#: Header and body are small maps; anything bigger is an attack or a bug.
MAX_HEADER = 512
MAX_BODY = 1 << 20


class Buffer(Protocol):
    """Anything with a length that supports the buffer protocol (bytes, zmq.Frame, memoryview)."""

    def __len__(self) -> int: ...


class Envelope(NamedTuple):
    """A decoded message: header fields, the validated message and its bulk frames."""

    type: str
    id: int
    re: int
    version: tuple[int, int]
    msg: Message
    bulk: tuple[memoryview, ...]


_FIELDS: dict[type[Message], tuple[tuple[str, Spec], ...]] = {}
_CHECKS: dict[type[Message], tuple[tuple[str, Validator, Spec], ...]] = {}


def _fields(cls: type[Message]) -> tuple[tuple[str, Spec], ...]:
    """The (name, spec) pairs of ``cls``'s wire fields in field order, cached per class."""
    cached = _FIELDS.get(cls)
    if cached is None:
        cached = tuple((f.name, f.metadata["wire"]) for f in dataclasses.fields(cls))
        _FIELDS[cls] = cached
    return cached


_NAMES: dict[type[Message], tuple[str, ...]] = {}


def _names(cls: type[Message]) -> tuple[str, ...]:
    """The wire field names of ``cls`` in field order, cached per class."""
    cached = _NAMES.get(cls)
    if cached is None:
        cached = _NAMES[cls] = tuple(name for name, _ in _fields(cls))
    return cached


def _checks(cls: type[Message]) -> tuple[tuple[str, Validator, Spec], ...]:
    """The (name, validator, spec) triples ``decode`` runs for ``cls``, cached per class."""
    cached = _CHECKS.get(cls)
    if cached is None:
        cached = tuple((name, VALIDATORS[spec.kind], spec) for name, spec in _fields(cls))
        _CHECKS[cls] = cached
    return cached


def encode(msg: Message, id: int, re: int = 0, bulk: Sequence[Any] = ()) -> list[Any]:
    """Return the frames of ``msg``: delimiter, header, body and ``bulk`` as given.

    ``bulk`` frames are passed through untouched (bytes, memoryview or numpy
    buffers), so the caller may send them with ``copy=False``.
    """
    cls = type(msg)
    if len(bulk) != len(cls.BULK):
        raise ValueError(f"{cls.TYPE} carries {len(cls.BULK)} bulk frames, got {len(bulk)}")
    header = msgpack.packb({"v": list(PROTOCOL_VERSION), "type": cls.TYPE, "id": id, "re": re})
    # msgpack packs tuples as arrays, so the frozen messages' tuples need no conversion.
    fields = {name: getattr(msg, name) for name in _names(cls)}
    for name, default in _omitted(cls):
        if fields[name] == default:
            del fields[name]
    body = msgpack.packb(fields)
    return [b"", header, body, *bulk]


_OMITTED: dict[type[Message], tuple[tuple[str, Any], ...]] = {}


def _omitted(cls: type[Message]) -> tuple[tuple[str, Any], ...]:
    """The (name, default) of ``cls``'s fields left out while they hold the default."""
    cached = _OMITTED.get(cls)
    if cached is None:
        cached = tuple((n, spec.default) for n, spec in _fields(cls) if spec.omit_default)
        _OMITTED[cls] = cached
    return cached


_HEADER_V = list(PROTOCOL_VERSION)


def _head(mtype: str) -> bytes:
    """The packed header up to the id's value: a 4-entry map in the general encoder's order."""
    full: bytes = msgpack.packb({"v": _HEADER_V, "type": mtype, "id": 0, "re": 0})
    return full[: -len(msgpack.packb(0) + _NO_RE)]


_NO_RE = b"\xa2re\x00"  # the key "re" and the value 0, packed
_INVALIDATE_HEAD = _head("invalidate")
_ACK_HEAD = _head("ack")
#: Packs one integer, a third of ``msgpack.packb``'s cost (which builds a Packer per call).
#: Shared safely: packing an int runs no Python code, so no other thread or finalizer can
#: enter it midway (the GIL is held throughout), and ``autoreset`` empties it after each.
_pack_int = msgpack.Packer().pack


def encode_invalidate(
    n: int, mirror: int, packed_items: bytes, id: int, packed_mirrors: bytes = b""
) -> list[Any]:
    """``encode(Invalidate(n, mirror, items, mirrors), id)`` from items packed once and shared.

    The fan-out hot path: ``packed_items`` is ``msgpack.packb(items)``, the same
    for every mirror an invalidation reaches, so only the small map around it is
    built per session; ``packed_mirrors``, ``msgpack.packb(mirrors)`` or empty for
    none (1.2, SPEC §4.3). The bytes are identical to the general encoder's (the
    unit tests check it).
    """
    header = b"".join((_INVALIDATE_HEAD, _pack_int(id), _NO_RE))
    # A 3-entry map (4 with mirrors), keys in field order, the lists spliced in packed.
    body = b"".join(
        (
            b"\x84\xa1n" if packed_mirrors else b"\x83\xa1n",
            _pack_int(n),
            b"\xa6mirror",
            _pack_int(mirror),
            b"\xa5items",
            packed_items,
            b"\xa7mirrors" if packed_mirrors else b"",
            packed_mirrors,
        )
    )
    return [b"", header, body]


def encode_ack(n: int, id: int) -> list[Any]:
    """``encode(Ack(n), id)`` for the agents' hot path; same bytes as the general encoder."""
    return [b"", b"".join((_ACK_HEAD, _pack_int(id), _NO_RE)), b"\x81\xa1n" + _pack_int(n)]


def _unpack(frame: Buffer, limit: int, what: str) -> dict[str, Any]:
    """Unpack a header or body frame of at most ``limit`` bytes that must hold a map."""
    if len(frame) > limit:
        raise TooLarge(f"{what} frame of {len(frame)} bytes exceeds {limit}")
    try:
        # msgpack (>= 1.0) bounds every declared length by the buffer size, which is
        # checked above, so a peer can never make it allocate more than the frame.
        # Arrays come back as tuples: the messages keep tuples anyway, so nothing is rebuilt.
        value = msgpack.unpackb(
            frame, raw=False, strict_map_key=True, max_ext_len=0, use_list=False
        )
    except Exception as exc:  # msgpack raises a zoo of types; all mean "not our format"
        raise DecodeError(f"{what} is not valid msgpack: {exc}") from exc
    if type(value) is not dict:
        raise DecodeError(f"{what} must be a msgpack map")
    return value


def decode_header(frames: Sequence[Buffer]) -> tuple[str, int, int, tuple[int, int]]:
    """Check the frame layout and header; return (type, id, re, version)."""
    if len(frames) < 3:
        raise DecodeError(f"a message has at least 3 frames, got {len(frames)}")
    if len(frames[0]) != 0:
        raise DecodeError("the first frame must be the empty delimiter")
    for frame in frames:
        if len(frame) > MAX_FRAME:
            raise TooLarge(f"frame of {len(frame)} bytes exceeds {MAX_FRAME}")
    header = _unpack(frames[1], MAX_HEADER, "header")
    version = header.get("v")
    if type(version) is not tuple or len(version) != 2:
        raise DecodeError("header field 'v' must be [major, minor]")
    major, minor = version
    if type(major) is not int or type(minor) is not int or not 0 <= major < 65536 > minor >= 0:
        raise DecodeError("header field 'v' must be [major, minor]")
    ver = (major, minor)
    mtype = header.get("type")
    if type(mtype) is not str or len(mtype) > 32:
        raise DecodeError("header field 'type' must be a short string")
    msg_id = header.get("id", 0)
    re = header.get("re", 0)
    if type(msg_id) is not int or not 0 <= msg_id < 1 << 64:
        raise DecodeError("header field 'id' must be a u64")
    if type(re) is not int or not 0 <= re < 1 << 64:
        raise DecodeError("header field 're' must be a u64")
    if not compatible(ver):
        exc = VersionError(
            f"peer speaks protocol {ver[0]}.{ver[1]}, "
            f"we speak {PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}"
        )
        exc.id = msg_id
        raise exc
    return mtype, msg_id, re, ver


def decode(frames: Sequence[Buffer]) -> Envelope:
    """Decode and validate one message's frames (without the identity frame).

    Raises a ``ProtocolError`` subclass for anything that is not a valid
    message; the exception's ``code`` is the wire error code to answer with,
    and its ``id`` the header's ``id`` once the header was read whole.
    """
    if len(frames) == 3:  # ACK and INVALIDATE, the round trip's messages, read directly
        env = _decode_hot(frames)
        if env is not None:
            return env
    mtype, msg_id, re, ver = decode_header(frames)
    # A try block costs nothing in CPython 3.11 until it catches.
    try:
        cls = TYPES.get(mtype)
        if cls is None:
            raise UnknownMessage(f"unknown message type {mtype!r}")
        raw = _unpack(frames[2], MAX_BODY, "body")
        values: dict[str, Any] = {}
        for name, validate, spec in _checks(cls):
            if name in raw:
                values[name] = validate(name, spec, raw[name])
            elif spec.default is REQUIRED:
                raise DecodeError(f"{mtype} is missing field {name!r}")
        msg = cls(**values)
        if len(frames) == 3 and not cls.BULK:
            return Envelope(mtype, msg_id, re, ver, msg, ())
        bulk = tuple(memoryview(f) for f in frames[3:])  # type: ignore[arg-type]
        expected = msg.bulk_sizes()
        if len(bulk) != len(expected):
            raise DecodeError(f"{mtype} carries {len(expected)} bulk frames, got {len(bulk)}")
        for name, frame, size in zip(cls.BULK, bulk, expected, strict=True):
            if frame.nbytes != size:
                raise DecodeError(
                    f"{mtype} bulk frame {name!r} has {frame.nbytes} bytes, expected {size}"
                )
        return Envelope(mtype, msg_id, re, ver, msg, bulk)
    except ProtocolError as exc:
        exc.id = msg_id
        raise


# --- the fast path of the invalidation round trip --------------------------------------------
#
# ACK (one per agent per invalidation, SPEC §4) and INVALIDATE are the hottest messages. The
# hot encoders (``encode_ack``, ``encode_invalidate``) write their headers as fixed bytes
# around the id; a message whose header is exactly that is read here without the general
# path's header walk, and its body without the per-field loop. Anything else, or anything odd
# (a non-canonical integer, a field missing or of the wrong kind), returns None and takes the
# general path, which then raises what it always raised. What comes back is what ``decode``
# would give: the header is then the map {"v": [1, 0], "type": T, "id": ID, "re": 0}.

_ACK_BODY = b"\x81\xa1n"
_VERSION = (PROTOCOL_VERSION[0], PROTOCOL_VERSION[1])
_ITEMS_SPEC = dict(_fields(Invalidate))["items"]


def _u64(b: bytes) -> int:
    """The u64 that ``b`` packs, exactly and alone; -1 if it is anything else."""
    try:
        value = msgpack.unpackb(b)
    except Exception:  # extra bytes, a truncated or invalid one: not the hot form
        return -1
    if type(value) is not int or value < 0:
        return -1
    return value


def _decode_hot(frames: Sequence[Buffer]) -> Envelope | None:
    """``decode`` of an ACK or INVALIDATE in the hot encoders' form; None for anything else."""
    if len(frames[0]) != 0 or len(frames[1]) > MAX_HEADER:
        return None
    head = bytes(frames[1])  # type: ignore[call-overload]
    if not head.endswith(_NO_RE):
        return None
    if head.startswith(_ACK_HEAD):
        if len(frames[2]) > 12:  # the longest {"n": u64}
            return None
        body = bytes(frames[2])  # type: ignore[call-overload]
        msg_id = _u64(head[len(_ACK_HEAD) : -len(_NO_RE)])
        n = _u64(body[len(_ACK_BODY) :]) if body.startswith(_ACK_BODY) else -1
        if msg_id < 0 or n < 0:
            return None
        return Envelope("ack", msg_id, 0, _VERSION, Ack(n=n), ())
    if head.startswith(_INVALIDATE_HEAD):
        msg_id = _u64(head[len(_INVALIDATE_HEAD) : -len(_NO_RE)])
        if msg_id < 0:
            return None
        try:
            raw = _unpack(frames[2], MAX_BODY, "body")
            if len(raw) != 3:  # 1.2's ``mirrors``, or anything else: the general path
                return None
            n_, mirror = raw.get("n"), raw.get("mirror")
            if type(n_) is not int or type(mirror) is not int or n_ < 0 or mirror < 0:
                return None
            items: Any = _check_items("items", _ITEMS_SPEC, raw.get("items"))
        except ProtocolError:
            return None
        return Envelope("invalidate", msg_id, 0, _VERSION, Invalidate(n_, mirror, items), ())
    return None
