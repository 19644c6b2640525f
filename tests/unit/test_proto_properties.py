"""Property-based tests of the proto package (hypothesis): round trips and a total decoder.

What this adds to ``test_codec.py``:

* The message classes are *discovered* in ``hmmirror.proto.messages`` (every
  ``Message`` subclass the module defines), not taken from ``ALL_MESSAGES``: a
  class added to the module but forgotten in ``ALL_MESSAGES``, or a field kind
  without a strategy, fails ``test_every_message_class_has_a_strategy``.
* Values lean on the boundaries of each field (0, 1, the cap, 2^63, 2^64-1),
  and bulk frames are bytes, bytearray, memoryview or numpy arrays, as senders pass them.
* Encoding is canonical: decoding and re-encoding gives the same bytes.
* The decoder is total on hostile input that *looks* like ours: arbitrary
  msgpack values in the header and in the body (under the real field names of
  a real type), arbitrary bulk frames. It returns an ``Envelope`` or raises a
  ``ProtocolError`` whose ``code`` fits its class, never anything else, and
  whatever it accepts satisfies the schema and survives a round trip.
* Every truncation of every bulk frame of a valid message is refused.

Each test is bounded by ``max_examples`` and a per-example deadline; the file
runs in a few seconds.
"""

from __future__ import annotations

import dataclasses
import inspect
import random
from datetime import timedelta
from typing import Any

import msgpack
import numpy as np
import pytest
from hmmirror.proto import (
    PROTOCOL_VERSION,
    DecodeError,
    ErrorCode,
    ProtocolError,
    TooLarge,
    UnknownMessage,
    VersionError,
    decode,
    encode,
)
from hmmirror.proto import messages as M
from hmmirror.proto.codec import Envelope, decode_header
from hmmirror.proto.schema import REQUIRED, U64_MAX, Kind, Spec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

#: Per-example deadline: generous, since the 2-vCPU machines are shared by parallel runs.
DEADLINE = timedelta(milliseconds=1000)
#: Longest generated list: the exact caps are covered by ``test_codec.py``.
LIST_CAP = 24
#: Largest bulk frame length generated, except when a page count is drawn at its cap.
SMALL_PAGES = 16
TEXT = st.characters(blacklist_categories=("Cs",))  # lone surrogates cannot be UTF-8


# --- discovering the messages ---------------------------------------------------------------


def discovered_messages() -> list[type[M.Message]]:
    """Every concrete ``Message`` subclass defined in ``hmmirror.proto.messages`` or one of
    its modules, whether or not the package re-exports it."""
    found: set[type[M.Message]] = set()
    todo = [M.Message]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith(M.__name__) and sub not in found:
                found.add(sub)
                todo.append(sub)
    exported = {obj for obj in vars(M).values() if inspect.isclass(obj)}
    assert found <= exported, f"not re-exported: {sorted(c.__name__ for c in found - exported)}"
    return sorted(found, key=lambda cls: cls.__name__)


def specs(cls: type[M.Message]) -> list[tuple[str, Spec]]:
    """The (name, Spec) pairs of ``cls``'s wire fields, in field order."""
    return [(f.name, f.metadata["wire"]) for f in dataclasses.fields(cls)]


# --- value strategies -----------------------------------------------------------------------


def uints(bound: int) -> st.SearchStrategy[int]:
    """Integers in [0, ``bound``], with the boundaries drawn often."""
    edges = sorted({v for v in (0, 1, 2, 4095, 4096, 1 << 32, 1 << 47, 1 << 63) if v <= bound})
    edges += [bound - 1, bound] if bound > 0 else [bound]
    return st.one_of(st.sampled_from(edges), st.integers(0, bound))


def u64s() -> st.SearchStrategy[int]:
    """Any u64, boundaries often."""
    return uints(U64_MAX)


def intervals() -> st.SearchStrategy[tuple[int, int]]:
    """A [start, end) pair of u64 with start < end, near the edges of the space too."""
    return st.tuples(u64s(), u64s()).filter(lambda p: p[0] != p[1]).map(lambda p: tuple(sorted(p)))


def stat_values() -> st.SearchStrategy[int | float | str]:
    """What a STATS map may hold: numbers (NaN excluded: it is never equal to itself) or text."""
    return st.one_of(
        st.integers(-(1 << 63), U64_MAX),
        st.floats(allow_nan=False),
        st.text(TEXT, max_size=256),
    )


#: One strategy per field kind; a kind added to the schema without one fails the coverage test.
KIND_STRATEGIES: dict[Kind, Any] = {
    Kind.UINT: lambda spec: uints(spec.max),
    Kind.BOOL: lambda spec: st.booleans(),
    Kind.STR: lambda spec: st.text(TEXT, max_size=spec.max),
    Kind.UINTS: lambda spec: st.lists(u64s(), max_size=min(spec.max, LIST_CAP)).map(tuple),
    Kind.INTERVALS: lambda spec: st.lists(intervals(), max_size=min(spec.max, LIST_CAP)).map(tuple),
    Kind.ITEMS: lambda spec: st.lists(
        st.tuples(u64s(), u64s(), u64s(), u64s()), max_size=min(spec.max, LIST_CAP)
    ).map(tuple),
    Kind.STATS: lambda spec: st.dictionaries(
        st.text(TEXT, max_size=64), stat_values(), max_size=min(spec.max, 12)
    ),
}


def field_strategy(name: str, spec: Spec) -> st.SearchStrategy[Any]:
    """Values of one field; page counts stay small unless drawn at their cap."""
    if spec.kind is Kind.UINT and name in ("npages", "length") and spec.max > SMALL_PAGES:
        # A page count (or byte length) sizes the bulk frames: keep most examples small,
        # but draw the cap itself now and then, the multi-megabyte frames included.
        strat: st.SearchStrategy[Any] = st.one_of(
            st.integers(0, SMALL_PAGES), st.just(spec.max), st.just(spec.max - 1)
        )
    else:
        strat = KIND_STRATEGIES[spec.kind](spec)
    if spec.default is not REQUIRED:
        strat = st.one_of(st.just(spec.default), strat)
    return strat


def message_strategy(cls: type[M.Message]) -> st.SearchStrategy[M.Message]:
    """Instances of ``cls`` built field by field from the declared specs."""
    fields = {name: field_strategy(name, spec) for name, spec in specs(cls)}
    return st.builds(cls, **fields)


STRATEGIES: dict[type[M.Message], st.SearchStrategy[M.Message]] = {
    cls: message_strategy(cls) for cls in M.ALL_MESSAGES
}
MESSAGES = discovered_messages()


def bulk_frames(msg: M.Message, rng: random.Random, form: str) -> list[Any]:
    """Bulk frames of exactly the declared sizes, in the buffer type ``form``."""
    frames: list[Any] = []
    for name, size in zip(type(msg).BULK, msg.bulk_sizes(), strict=True):
        raw = rng.randbytes(size)
        if form == "numpy" and name == "entries":
            frames.append(np.frombuffer(raw, dtype="<u8").copy())
        elif form == "bytearray":
            frames.append(bytearray(raw))
        elif form == "memoryview":
            frames.append(memoryview(raw))
        else:
            frames.append(raw)
    return frames


def as_bytes(frame: Any) -> bytes:
    """The bytes of any buffer (numpy arrays included)."""
    return memoryview(frame).cast("B").tobytes()


# --- coverage of the message set -------------------------------------------------------------


def test_every_message_class_has_a_strategy() -> None:
    """A message class defined in the messages package but missing anywhere below fails here."""
    assert MESSAGES, "no Message subclass found in hmmirror.proto.messages"
    missing = [cls.__name__ for cls in MESSAGES if cls not in STRATEGIES]
    assert not missing, f"message classes without a strategy (not in ALL_MESSAGES?): {missing}"
    assert set(MESSAGES) == set(M.ALL_MESSAGES) == set(M.TYPES.values())
    assert all(M.TYPES[cls.TYPE] is cls for cls in MESSAGES)
    assert all(cls.TYPE and len(cls.TYPE) <= 32 for cls in MESSAGES), "decode caps types at 32"
    for cls in MESSAGES:
        for name, spec in specs(cls):
            assert spec.kind in KIND_STRATEGIES, f"{cls.TYPE}.{name}: no strategy for {spec.kind}"
        assert len(cls.BULK) == len(cls(**_minimal(cls)).bulk_sizes()), cls.TYPE


def _minimal(cls: type[M.Message]) -> dict[str, Any]:
    """The smallest valid field values of ``cls`` (zeros, False, empty)."""
    zero = {Kind.UINT: 0, Kind.BOOL: False, Kind.STR: "", Kind.UINTS: (), Kind.INTERVALS: ()}
    zero |= {Kind.ITEMS: (), Kind.STATS: {}}
    return {name: zero[spec.kind] for name, spec in specs(cls)}


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.TYPE)
@settings(max_examples=40, deadline=DEADLINE, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    msg_id=u64s(),
    re=u64s(),
    seed=st.integers(0, 1 << 32),
    form=st.sampled_from(["bytes", "bytearray", "memoryview", "numpy"]),
)
def test_round_trip_is_exact_and_canonical(
    cls: type[M.Message], data: st.DataObject, msg_id: int, re: int, seed: int, form: str
) -> None:
    """encode → decode gives the message, ids and bulk back; re-encoding gives the same bytes."""
    msg = data.draw(STRATEGIES[cls])
    bulk = bulk_frames(msg, random.Random(seed), form)
    frames = encode(msg, id=msg_id, re=re, bulk=bulk)
    assert len(frames) == 3 + len(cls.BULK)
    env = decode(frames)  # straight from encode: the bulk frames in the sender's own form
    assert type(env.msg) is cls and env.msg == msg
    assert (env.type, env.id, env.re, env.version) == (cls.TYPE, msg_id, re, PROTOCOL_VERSION)
    assert [b.nbytes for b in env.bulk] == list(msg.bulk_sizes())
    assert [b.tobytes() for b in env.bulk] == [as_bytes(b) for b in bulk]
    # Canonical: what was decoded encodes to the very same header and body bytes.
    again = encode(env.msg, id=env.id, re=env.re, bulk=env.bulk)
    assert again[:3] == frames[:3]
    wire = [as_bytes(f) for f in frames]
    assert decode(wire).msg == msg, "the same message from plain bytes, as ZeroMQ delivers it"


# --- the decoder on hostile input -----------------------------------------------------------


def _msgpack_values() -> st.SearchStrategy[Any]:
    """Any value msgpack can pack, nested, with the integer and string edges."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(1 << 63), U64_MAX),
        st.sampled_from([-1, 0, 1, 1 << 32, 1 << 47, U64_MAX, -(1 << 63)]),
        st.floats(),
        st.text(TEXT, max_size=40),
        st.binary(max_size=40),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=6),
            st.dictionaries(st.text(TEXT, max_size=8), inner, max_size=6),
        ),
        max_leaves=24,
    )


VALUES = _msgpack_values()
TYPE_NAMES = st.one_of(st.sampled_from(sorted(M.TYPES)), st.text(TEXT, max_size=40), VALUES)


@st.composite
def hostile_frames(draw: st.DrawFn) -> list[Any]:
    """Frame sets that look like ours: a plausible header, a body of real field names with
    arbitrary values, and bulk frames of the right or wrong sizes; some frames are raw bytes.

    Half the examples are near-valid (every field valid but perhaps one, bulk sized to
    match), so that the decoder's acceptance path is exercised as hard as its refusals.
    """
    near_valid = draw(st.booleans())
    if near_valid:
        mtype: Any = draw(st.sampled_from(sorted(M.TYPES)))
        version: Any = list(PROTOCOL_VERSION)
    else:
        mtype = draw(TYPE_NAMES)
        version = draw(st.one_of(st.just(list(PROTOCOL_VERSION)), VALUES))
    header: dict[str, Any] = {"v": version, "type": mtype}
    for key in ("id", "re"):
        if draw(st.booleans()):
            header[key] = draw(u64s() if near_valid else st.one_of(u64s(), VALUES))
    header.update(draw(st.dictionaries(st.text(TEXT, max_size=6), VALUES, max_size=2)))
    cls = M.TYPES.get(mtype) if isinstance(mtype, str) else None
    body: Any
    bulk: list[bytes] = draw(st.lists(st.binary(max_size=64), max_size=3))
    if cls is not None and (near_valid or draw(st.booleans())):
        body = {}
        names = [name for name, _ in specs(cls)]
        spoilt = draw(st.sampled_from([None, *names])) if near_valid else None
        for name, spec in specs(cls):
            choice = 0 if near_valid and name != spoilt else draw(st.integers(0, 3))
            if choice == 0:
                body[name] = draw(field_strategy(name, spec))  # a valid value
            elif choice in (1, 2):
                body[name] = draw(VALUES)  # anything at all
            # choice 3: the field is missing
        if near_valid and spoilt is None:
            sizes = cls(**body).bulk_sizes()
            bulk = [bytes(n) for n in sizes]
            body.update(draw(st.dictionaries(st.text(TEXT, max_size=6), VALUES, max_size=2)))
    else:
        body = draw(VALUES)
    frames: list[Any] = [
        b"" if near_valid else draw(st.sampled_from([b"", b"", b"x"])),
        msgpack.packb(header),
        msgpack.packb(body),
        *bulk,
    ]
    if draw(st.integers(0, 4)) == 0:  # sometimes one frame is replaced by raw bytes
        frames[draw(st.integers(0, len(frames) - 1))] = draw(st.binary(max_size=64))
    if draw(st.integers(0, 9)) == 0:  # and sometimes the frame count itself is wrong
        frames = frames[: draw(st.integers(0, len(frames)))]
    form = draw(st.sampled_from([bytes, bytearray, memoryview]))
    return [form(f) for f in frames]


#: The one ``code`` each ProtocolError class must carry.
CODES = {
    DecodeError: ErrorCode.BAD_MESSAGE,
    TooLarge: ErrorCode.TOO_LARGE,
    VersionError: ErrorCode.VERSION_MISMATCH,
    UnknownMessage: ErrorCode.UNKNOWN_MESSAGE,
}


def check_total(frames: list[Any]) -> Envelope | None:
    """Decode ``frames``: an Envelope, or None after a well-formed ProtocolError.

    Any other exception propagates and fails the calling test.
    """
    try:
        return decode(frames)
    except ProtocolError as exc:
        assert type(exc) in CODES, f"untyped protocol error {type(exc).__name__}: {exc}"
        assert exc.code == CODES[type(exc)], (type(exc).__name__, exc.code)
        assert str(exc), "error messages are never empty"
        return None


def check_accepted(env: Envelope) -> None:
    """What the decoder accepted obeys the schema and round-trips to the same encoding."""
    cls = type(env.msg)
    assert M.TYPES[env.type] is cls
    for name, spec in specs(cls):
        value = getattr(env.msg, name)
        if spec.kind is Kind.UINT:
            assert type(value) is int and 0 <= value <= spec.max, (name, value)
        elif spec.kind is Kind.BOOL:
            assert type(value) is bool, (name, value)
        elif spec.kind is Kind.STR:
            assert type(value) is str and len(value) <= spec.max, (name, value)
        elif spec.kind is Kind.INTERVALS:
            assert all(0 <= a < b <= U64_MAX for a, b in value), (name, value)
        elif spec.kind in (Kind.UINTS, Kind.ITEMS):
            flat = value if spec.kind is Kind.UINTS else [v for item in value for v in item]
            assert all(type(v) is int and 0 <= v <= U64_MAX for v in flat), (name, value)
            assert spec.kind is Kind.UINTS or all(len(item) == 4 for item in value)
        assert spec.kind is not Kind.STATS or type(value) is dict
    assert [b.nbytes for b in env.bulk] == list(env.msg.bulk_sizes())
    frames = encode(env.msg, id=env.id, re=env.re, bulk=env.bulk)
    again = decode([as_bytes(f) for f in frames])
    assert encode(again.msg, id=again.id, re=again.re, bulk=again.bulk)[:3] == frames[:3]


@settings(max_examples=600, deadline=DEADLINE, suppress_health_check=[HealthCheck.too_slow])
@given(frames=hostile_frames())
def test_decoder_is_total_on_lookalike_frames(frames: list[Any]) -> None:
    """Hostile but plausible frames: only typed ProtocolErrors, and accepted means valid."""
    env = check_total(frames)
    event("accepted" if env is not None else "refused")
    if env is not None:
        check_accepted(env)


@settings(max_examples=500, deadline=DEADLINE)
@given(
    frames=st.lists(
        st.one_of(st.binary(max_size=600), st.builds(msgpack.packb, VALUES)), max_size=7
    )
)
def test_decoder_is_total_on_arbitrary_frames(frames: list[bytes]) -> None:
    """Arbitrary bytes and arbitrary msgpack documents, in any frame position."""
    env = check_total(frames)
    if env is not None:
        check_accepted(env)


BULKY = [cls for cls in MESSAGES if cls.BULK]


@pytest.mark.parametrize("cls", BULKY, ids=lambda c: c.TYPE)
@settings(max_examples=25, deadline=DEADLINE, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 1 << 32))
def test_every_damaged_bulk_layout_is_refused(
    cls: type[M.Message], data: st.DataObject, seed: int
) -> None:
    """A bulk frame cut short or grown, or a frame missing or extra, is a DecodeError."""
    msg = data.draw(STRATEGIES[cls])
    rng = random.Random(seed)
    frames = [as_bytes(f) for f in encode(msg, id=5, bulk=bulk_frames(msg, rng, "bytes"))]
    i = data.draw(st.integers(3, len(frames) - 1))
    damaged = list(frames)
    op = data.draw(st.sampled_from(["truncate", "grow", "drop", "extra"]))
    if op == "truncate":
        if not frames[i]:
            op = "grow"  # an empty frame cannot be cut
        else:
            damaged[i] = frames[i][: data.draw(st.integers(0, len(frames[i]) - 1))]
    if op == "grow":
        damaged[i] = frames[i] + data.draw(st.binary(min_size=1, max_size=9))
    elif op == "drop":
        del damaged[i]
    elif op == "extra":
        damaged.insert(data.draw(st.integers(3, len(frames))), rng.randbytes(rng.choice([0, 8])))
    with pytest.raises(DecodeError) as info:
        decode(damaged)
    assert type(info.value) is DecodeError and info.value.code == ErrorCode.BAD_MESSAGE
    assert cls.TYPE in str(info.value), "the refusal names the message type"


@settings(max_examples=300, deadline=DEADLINE)
@given(frames=hostile_frames())
def test_decode_header_agrees_with_decode(frames: list[Any]) -> None:
    """``decode_header`` refuses exactly what ``decode`` refuses in its first steps, alike."""
    try:
        head = decode_header(frames)
    except ProtocolError as exc:
        with pytest.raises(type(exc)):
            decode(frames)
        return
    env = check_total(frames)
    if env is not None:
        assert (env.type, env.id, env.re, env.version) == head


def _header_id(frames: list[Any]) -> int | None:
    """The header ``id`` a receiver can read from ``frames``, or None if the header is bad."""
    try:
        return decode_header(frames)[1]
    except VersionError as exc:
        return exc.id  # a whole header, only the major version is foreign
    except ProtocolError:
        return None


@settings(max_examples=400, deadline=DEADLINE, suppress_health_check=[HealthCheck.too_slow])
@given(frames=hostile_frames())
def test_refusals_name_the_request_once_its_header_was_read(frames: list[Any]) -> None:
    """A refusal after a readable header carries its ``id`` (the daemon answers with it in
    ``re``, so the sender's request fails at once); before that, ``id`` is 0."""
    try:
        decode(frames)
    except ProtocolError as exc:
        readable = _header_id(frames)
        event("named" if readable is not None else "anonymous")
        assert exc.id == (readable or 0), (type(exc).__name__, exc, exc.id, readable)


def test_refusal_ids_by_stage() -> None:
    """One example per stage: the header, the version, the type, the body, the bulk frames."""
    hello = msgpack.packb({"agent": "a"})

    def refusal(frames: list[bytes]) -> ProtocolError:
        with pytest.raises(ProtocolError) as info:
            decode(frames)
        return info.value

    def hdr(mtype: str, v: Any = None) -> bytes:
        return msgpack.packb({"v": v or list(PROTOCOL_VERSION), "type": mtype, "id": 77})

    assert refusal([b"", msgpack.packb({"v": "1.0", "type": "hello", "id": 77}), hello]).id == 0
    assert refusal([b"", hdr("hello", [9, 0]), hello]).id == 77
    assert refusal([b"", hdr("nope"), hello]).id == 77
    assert refusal([b"", hdr("hello"), b"\xc1"]).id == 77
    assert refusal([b"", hdr("hello"), msgpack.packb({"agent": 1})]).id == 77
    assert refusal([b"", hdr("hello"), hello, b"extra"]).id == 77
    read = msgpack.packb({"mirror": 1, "start": 0, "npages": 1})
    assert refusal([b"", hdr("dma_read"), read, bytes(7)]).id == 77
