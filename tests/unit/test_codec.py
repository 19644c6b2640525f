"""Codec tests: every message round-trips, and decode refuses every malformed frame set.

Strategies are built from the wire specs the messages declare
(``dataclasses.fields(cls)[i].metadata["wire"]``), so a new message type or a
changed bound is covered without touching this file. The last section covers
the uffd intake's line, the one exchange that is not a codec message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import random
from typing import Any

import msgpack
import numpy as np
import pytest
from hmmirror.proto import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    DecodeError,
    ErrorCode,
    ProtocolError,
    TooLarge,
    UnknownMessage,
    VersionError,
    decode,
    encode,
    intake,
)
from hmmirror.proto import entries as E
from hmmirror.proto import messages as M
from hmmirror.proto.codec import MAX_BODY, MAX_HEADER
from hmmirror.proto.errors import CODE_OF_ERRNO, ERRNO_OF_CODE
from hmmirror.proto.schema import REQUIRED, U64_MAX, Kind, Spec
from hmmirror.transport import DoorError, Peer
from hmmirror.transport.door import Door
from hmmirror.transport.intake import intake_path, offer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

#: Hypothesis list sizes: the exact caps are exercised by the targeted tests below.
LIST_CAP = 40
TEXT = st.characters(blacklist_categories=("Cs",))  # lone surrogates cannot be UTF-8


# --- strategies from the wire specs ---------------------------------------------------------


def wire_specs(cls: type[M.Message]) -> list[tuple[str, Spec]]:
    """The (name, Spec) pairs of a message class, in field order."""
    return [(f.name, f.metadata["wire"]) for f in dataclasses.fields(cls)]


def _u64() -> st.SearchStrategy[int]:
    return st.integers(0, U64_MAX)


def value_strategy(spec: Spec) -> st.SearchStrategy[Any]:
    """A strategy for every value the codec must accept for ``spec``."""
    kind = spec.kind
    if kind is Kind.UINT:
        return st.integers(0, spec.max)
    if kind is Kind.BOOL:
        return st.booleans()
    if kind is Kind.STR:
        return st.text(TEXT, max_size=spec.max)
    cap = min(spec.max, LIST_CAP)
    if kind is Kind.UINTS:
        return st.lists(_u64(), max_size=cap).map(tuple)
    if kind is Kind.INTERVALS:
        pair = st.tuples(st.integers(0, U64_MAX - 1), st.integers(1, U64_MAX)).map(
            lambda p: (min(p), max(p)) if p[0] != p[1] else (p[0], p[0] + 1)
        )
        return st.lists(pair, max_size=cap).map(tuple)
    if kind is Kind.ITEMS:
        item = st.tuples(_u64(), _u64(), _u64(), _u64())
        return st.lists(item, max_size=cap).map(tuple)
    if kind is Kind.STATS:
        stat = st.one_of(
            st.integers(-(1 << 63), U64_MAX),
            st.floats(allow_nan=False),
            st.text(TEXT, max_size=256),
        )
        return st.dictionaries(st.text(TEXT, max_size=64), stat, max_size=min(spec.max, 20))
    raise AssertionError(f"no strategy for {kind}")


def message_strategy(cls: type[M.Message]) -> st.SearchStrategy[M.Message]:
    """Instances of ``cls``; optional fields are sometimes left at their default."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, spec in wire_specs(cls):
        strat = value_strategy(spec)
        if spec.default is not REQUIRED:
            strat = st.one_of(st.just(spec.default), strat)
        fields[name] = strat
    return st.builds(cls, **fields)


def bulk_for(msg: M.Message, seed: int) -> list[bytes]:
    """Bulk frames of exactly the sizes ``msg`` declares, filled from ``seed``."""
    rng = random.Random(seed)
    return [rng.randbytes(size) for size in msg.bulk_sizes()]


def frames_of(msg: M.Message, *, id: int = 1, re: int = 0) -> list[bytes]:
    return [bytes(f) for f in encode(msg, id=id, re=re, bulk=bulk_for(msg, 0))]


def raw_frames(header: Any, body: Any, *bulk: bytes) -> list[bytes]:
    """Frames with a hand-built header and body (anything msgpack can pack)."""
    return [b"", msgpack.packb(header), msgpack.packb(body), *bulk]


def hdr(mtype: str, **extra: Any) -> dict[str, Any]:
    return {"v": list(PROTOCOL_VERSION), "type": mtype, "id": 7, "re": 0, **extra}


def rejects(frames: list[Any], exc: type[ProtocolError], code: ErrorCode) -> ProtocolError:
    """Assert ``decode(frames)`` raises ``exc`` (exact class) whose ``code`` is ``code``."""
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    assert info.value.code == code
    assert str(info.value), "error messages are never empty"
    return info.value


# --- round trips ----------------------------------------------------------------------------


def test_every_type_is_covered() -> None:
    assert len(M.ALL_MESSAGES) == len(M.TYPES)
    assert set(M.TYPES) == {cls.TYPE for cls in M.ALL_MESSAGES}
    for cls in M.ALL_MESSAGES:
        for f in dataclasses.fields(cls):
            assert isinstance(f.metadata["wire"], Spec), (cls.TYPE, f.name)


@pytest.mark.parametrize("cls", M.ALL_MESSAGES, ids=lambda c: c.TYPE)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), id=_u64(), re=_u64(), seed=st.integers(0, 1 << 32))
def test_round_trip(cls: type[M.Message], data: st.DataObject, id: int, re: int, seed: int) -> None:
    msg = data.draw(message_strategy(cls))
    bulk = bulk_for(msg, seed)
    frames = encode(msg, id=id, re=re, bulk=bulk)
    assert frames[0] == b""
    assert len(frames) == 3 + len(cls.BULK)
    env = decode([bytes(f) for f in frames])
    assert env.msg == msg
    assert type(env.msg) is cls
    assert env.type == cls.TYPE
    assert (env.id, env.re) == (id, re)
    assert env.version == PROTOCOL_VERSION
    assert [bytes(b) for b in env.bulk] == bulk
    assert [b.nbytes for b in env.bulk] == list(msg.bulk_sizes())


BULKY = [cls for cls in M.ALL_MESSAGES if cls.BULK]
#: Bulky messages whose frames are sized in pages (entries and whole-page data).
PAGED = [cls for cls in BULKY if "npages" in dict(wire_specs(cls))]


def _npages_bound(cls: type[M.Message]) -> int:
    return dict(wire_specs(cls))["npages"].max


@pytest.mark.parametrize("cls", PAGED, ids=lambda c: c.TYPE)
@pytest.mark.parametrize("where", ["zero", "one", "max"])
def test_bulk_exact_sizes_round_trip(cls: type[M.Message], where: str) -> None:
    npages = {"zero": 0, "one": 1, "max": _npages_bound(cls)}[where]
    extra = {"seq": 4} if "seq" in dict(wire_specs(cls)) else {}
    msg = cls(mirror=3, start=1 << 20, npages=npages, **extra)
    bulk = bulk_for(msg, npages)
    sizes = [len(b) for b in bulk]
    per_page = {"entries": 8, "data": 4096}
    assert sizes == [npages * per_page[name] for name in cls.BULK]
    assert max(sizes) <= MAX_FRAME
    env = decode([bytes(f) for f in encode(msg, id=1, bulk=bulk)])
    assert env.msg == msg
    assert [bytes(b) for b in env.bulk] == bulk


def test_bulk_numpy_entries_round_trip() -> None:
    table = np.arange(5, dtype=np.uint64) | np.uint64(E.HMM_PFN_VALID)
    msg = M.FaultReply(mirror=1, start=0, npages=5, seq=2)
    frames = encode(msg, id=9, bulk=[table])
    assert frames[3] is table, "bulk frames pass through untouched"
    env = decode([bytes(f) for f in frames[:3]] + [E.to_wire(table)])
    np.testing.assert_array_equal(E.from_wire(env.bulk[0], 5), table)


def _max_string(n: int) -> str:
    return "\U0010ffff" * n  # 4 UTF-8 bytes per character: the most bytes a cap allows


def _at_caps(cls: type[M.Message]) -> M.Message:
    """An instance with every field at its declared cap (longest lists and strings)."""
    values: dict[str, Any] = {}
    for name, spec in wire_specs(cls):
        k = spec.kind
        if k is Kind.UINT:
            values[name] = spec.max
        elif k is Kind.BOOL:
            values[name] = True
        elif k is Kind.STR:
            values[name] = _max_string(spec.max)
        elif k is Kind.UINTS:
            values[name] = (U64_MAX,) * spec.max
        elif k is Kind.INTERVALS:
            values[name] = ((U64_MAX - 1, U64_MAX),) * spec.max
        elif k is Kind.ITEMS:
            values[name] = ((U64_MAX,) * 4,) * spec.max
        elif k is Kind.STATS:
            values[name] = {f"{i:03d}" + _max_string(61): _max_string(256) for i in range(spec.max)}
    return cls(**values)


# npages at its cap would make multi-megabyte bulk frames: those are covered above.
@pytest.mark.parametrize("cls", M.ALL_MESSAGES, ids=lambda c: c.TYPE)
def test_round_trip_at_declared_caps(cls: type[M.Message]) -> None:
    """Whatever the schema allows must fit the codec's frame limits (encode → decode).

    This caught ``evicted`` (65 536 mirror ids) and ``status_reply`` outgrowing the old
    256 KiB body limit; the caps were brought in line (4096 ids, a 1 MiB body).
    """
    msg = _at_caps(cls)
    if cls in PAGED:
        msg = dataclasses.replace(msg, npages=2)  # type: ignore[type-var]
    frames = encode(msg, id=U64_MAX, re=U64_MAX, bulk=bulk_for(msg, 1))
    assert len(frames[1]) <= MAX_HEADER
    assert len(frames[2]) <= MAX_BODY, (
        f"{cls.TYPE} at its declared caps encodes to a {len(frames[2])}-byte body, "
        f"over MAX_BODY = {MAX_BODY}: the schema allows what the codec refuses"
    )
    env = decode([bytes(f) for f in frames])
    assert env.msg == msg


def test_unknown_extra_fields_and_header_keys_are_ignored() -> None:
    body = {"agent": "a", "pid": 5, "future_field": [1, 2, {"x": 1}], "another": b"\x00"}
    env = decode(raw_frames(hdr("hello", sig="zz", trace={"k": 1}), body))
    assert env.msg == M.Hello(agent="a", pid=5)


def test_newer_minor_version_is_accepted() -> None:
    env = decode(raw_frames(hdr("ok", v=[PROTOCOL_VERSION[0], 99]), {}))
    assert env.version == (PROTOCOL_VERSION[0], 99)
    assert env.msg == M.Ok()


def test_optional_field_may_be_omitted() -> None:
    assert decode(raw_frames(hdr("hello"), {"agent": "x"})).msg == M.Hello(agent="x", pid=0)


def test_header_id_and_re_default_to_zero() -> None:
    env = decode(raw_frames({"v": [1, 0], "type": "status"}, {}))
    assert (env.id, env.re) == (0, 0)


# --- rejections: frame layout ---------------------------------------------------------------


OK_FRAMES = frames_of(M.Hello(agent="a", pid=1))


@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_few_frames(n: int) -> None:
    rejects(OK_FRAMES[:n], DecodeError, ErrorCode.BAD_MESSAGE)


def test_missing_delimiter() -> None:
    rejects([*OK_FRAMES[1:], b""], DecodeError, ErrorCode.BAD_MESSAGE)
    rejects([b"x", *OK_FRAMES[1:]], DecodeError, ErrorCode.BAD_MESSAGE)


def test_extra_frame_on_a_message_without_bulk() -> None:
    rejects([*OK_FRAMES, b""], DecodeError, ErrorCode.BAD_MESSAGE)


@pytest.mark.parametrize("index", [1, 2])
@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"\xc1",
        b"\x92\x01",
        b"\x81\xa1a",
        b"\xff" * 7,
        b"\x81\xa1a\x01\x00",
        b"\xd9\x03\xff\xfe\xfd",
    ],
    ids=[
        "empty",
        "never-used",
        "truncated-array",
        "truncated-map",
        "garbage",
        "extra-data",
        "bad-utf8",
    ],
)
def test_header_or_body_not_msgpack(index: int, junk: bytes) -> None:
    frames = list(OK_FRAMES)
    frames[index] = junk
    rejects(frames, DecodeError, ErrorCode.BAD_MESSAGE)


@pytest.mark.parametrize("value", [[1, 0], "hello", 5, None, b"\x80", 1.5, True])
@pytest.mark.parametrize("index", [1, 2])
def test_header_or_body_not_a_map(index: int, value: Any) -> None:
    frames = list(OK_FRAMES)
    frames[index] = msgpack.packb(value)
    rejects(frames, DecodeError, ErrorCode.BAD_MESSAGE)


def test_non_string_map_keys() -> None:
    rejects([b"", msgpack.packb({1: 2}), OK_FRAMES[2]], DecodeError, ErrorCode.BAD_MESSAGE)


def test_frame_over_max_frame_is_too_large() -> None:
    msg = M.DmaWrite(mirror=1, start=0, npages=1)
    good = frames_of(msg)
    for i in (3, 4):
        frames = list(good)
        frames[i] = b"\x00" * (MAX_FRAME + 1)
        rejects(frames, TooLarge, ErrorCode.TOO_LARGE)
    rejects([*good, b"\x00" * (MAX_FRAME + 1)], TooLarge, ErrorCode.TOO_LARGE)


def test_header_and_body_size_caps() -> None:
    big_header = hdr("hello", pad="x" * MAX_HEADER)
    rejects(raw_frames(big_header, {"agent": "a"}), TooLarge, ErrorCode.TOO_LARGE)
    big_body = {"agent": "a", "pad": "x" * MAX_BODY}
    rejects(raw_frames(hdr("hello"), big_body), TooLarge, ErrorCode.TOO_LARGE)


# --- rejections: header ---------------------------------------------------------------------


@pytest.mark.parametrize("major", [0, 2, PROTOCOL_VERSION[0] + 1, 65535])
def test_wrong_major_version(major: int) -> None:
    err = rejects(
        raw_frames(hdr("hello", v=[major, 0]), {"agent": "a"}),
        VersionError,
        ErrorCode.VERSION_MISMATCH,
    )
    assert f"{major}." in str(err)


def test_wrong_major_version_wins_over_unknown_type() -> None:
    # The version is checked first: a v2 peer may well speak types we don't know.
    rejects(
        raw_frames(hdr("from_the_future", v=[2, 0]), {}), VersionError, ErrorCode.VERSION_MISMATCH
    )


@pytest.mark.parametrize(
    "v", [None, [1], [1, 0, 0], "1.0", [1.0, 0], [True, 0], [-1, 0], [1 << 16, 0], {"a": 1}]
)
def test_malformed_version(v: Any) -> None:
    header = hdr("hello")
    if v is None:
        del header["v"]
    else:
        header["v"] = v
    rejects(raw_frames(header, {"agent": "a"}), DecodeError, ErrorCode.BAD_MESSAGE)


@pytest.mark.parametrize("mtype", ["nope", "", "Hello", "HELLO", "hello ", "__class__", "TYPES"])
def test_unknown_type(mtype: str) -> None:
    rejects(raw_frames(hdr(mtype), {}), UnknownMessage, ErrorCode.UNKNOWN_MESSAGE)


@pytest.mark.parametrize("mtype", [None, 3, b"hello", ["hello"], "x" * 33])
def test_malformed_type(mtype: Any) -> None:
    header = hdr("hello", type=mtype)
    if mtype is None:
        del header["type"]
    rejects(raw_frames(header, {"agent": "a"}), DecodeError, ErrorCode.BAD_MESSAGE)


@pytest.mark.parametrize("key", ["id", "re"])
@pytest.mark.parametrize("value", [-1, True, 1.0, "1", None, [1]])
def test_malformed_id_or_re(key: str, value: Any) -> None:
    rejects(
        raw_frames(hdr("hello", **{key: value}), {"agent": "a"}), DecodeError, ErrorCode.BAD_MESSAGE
    )


# --- rejections: body -----------------------------------------------------------------------


def _valid_body(cls: type[M.Message]) -> dict[str, Any]:
    msg = _small(cls)
    return msgpack.unpackb(frames_of(msg)[2])


def _small(cls: type[M.Message]) -> M.Message:
    values: dict[str, Any] = {}
    for name, spec in wire_specs(cls):
        values[name] = {
            Kind.UINT: min(spec.max, 1),
            Kind.BOOL: False,
            Kind.STR: "s",
            Kind.UINTS: (1,),
            Kind.INTERVALS: ((0, 4096),),
            Kind.ITEMS: ((1, 2, 3, 4),),
            Kind.STATS: {"k": 1},
        }[spec.kind]
    return cls(**values)


def _frames_with_body(cls: type[M.Message], body: dict[str, Any]) -> list[bytes]:
    return raw_frames(hdr(cls.TYPE), body, *bulk_for(_small(cls), 0))


REQUIRED_FIELDS = [
    (cls, name)
    for cls in M.ALL_MESSAGES
    for name, spec in wire_specs(cls)
    if spec.default is REQUIRED
]


@pytest.mark.parametrize("cls,name", REQUIRED_FIELDS, ids=lambda x: getattr(x, "TYPE", x))
def test_missing_required_field(cls: type[M.Message], name: str) -> None:
    body = _valid_body(cls)
    decode(_frames_with_body(cls, body))  # sanity: the untouched body is fine
    del body[name]
    err = rejects(_frames_with_body(cls, body), DecodeError, ErrorCode.BAD_MESSAGE)
    assert name in str(err)


UINT_FIELDS = [
    (cls, name, spec)
    for cls in M.ALL_MESSAGES
    for name, spec in wire_specs(cls)
    if spec.kind is Kind.UINT
]


@pytest.mark.parametrize("cls,name,spec", UINT_FIELDS, ids=lambda x: getattr(x, "TYPE", None))
def test_uint_fields_reject_wrong_types_and_ranges(
    cls: type[M.Message], name: str, spec: Spec
) -> None:
    bad: list[Any] = [True, False, -1, -(1 << 63), 1.0, "1", None, [1], b"\x01"]
    if spec.max < U64_MAX:
        bad.append(spec.max + 1)
    for value in bad:
        body = {**_valid_body(cls), name: value}
        with pytest.raises(DecodeError) as info:
            decode(_frames_with_body(cls, body))
        assert info.value.code in (ErrorCode.BAD_MESSAGE, ErrorCode.TOO_LARGE), value
        if not (type(value) is int and value > spec.max):
            assert info.value.code == ErrorCode.BAD_MESSAGE


def test_bool_field_rejects_ints() -> None:
    body = {"mirror": 1, "start": 0, "npages": 1, "write": 1, "mode": 0}
    rejects(_frames_with_body(M.Fault, body), DecodeError, ErrorCode.BAD_MESSAGE)
    body["write"] = None
    rejects(_frames_with_body(M.Fault, body), DecodeError, ErrorCode.BAD_MESSAGE)


def rejects_over_bound(frames: list[bytes]) -> None:
    """A uint above its bound: a DecodeError. SPEC.md §1.3 says BAD_MESSAGE, schema.py (since
    the lead's change) says TooLarge/TOO_LARGE; either is a typed rejection."""
    with pytest.raises(DecodeError) as info:
        decode(frames)
    assert info.value.code in (ErrorCode.BAD_MESSAGE, ErrorCode.TOO_LARGE)


def test_too_large_ints() -> None:
    rejects_over_bound(_frames_with_body(M.Hello, {"agent": "a", "pid": 1 << 32}))
    body = {"mirror": 1, "start": 0, "npages": M.MAX_FAULT_PAGES + 1, "write": False, "mode": 0}
    rejects_over_bound(_frames_with_body(M.Fault, body))
    body = {"mirror": 1, "start": 0, "npages": M.MAX_FAULT_PAGES, "write": False, "mode": 3}
    rejects_over_bound(_frames_with_body(M.Fault, body))
    rejects_over_bound(_frames_with_body(M.DmaRead, {"mirror": 1, "start": 0, "npages": 1025}))
    rejects_over_bound(_frames_with_body(M.Error, {"code": 65536, "message": "m"}))
    # At the bound is fine (bounds are inclusive).
    body = {"mirror": 1, "start": U64_MAX, "npages": M.MAX_FAULT_PAGES, "write": True, "mode": 1}
    assert decode(_frames_with_body(M.Fault, body)).msg.npages == M.MAX_FAULT_PAGES
    assert decode(_frames_with_body(M.Hello, {"agent": "", "pid": M.U32_MAX})).msg.pid == M.U32_MAX


def test_str_fields() -> None:
    rejects(_frames_with_body(M.Hello, {"agent": b"bytes"}), DecodeError, ErrorCode.BAD_MESSAGE)
    rejects(_frames_with_body(M.Hello, {"agent": 5}), DecodeError, ErrorCode.BAD_MESSAGE)
    rejects(
        _frames_with_body(M.Hello, {"agent": "a" * (M.NAME_MAX + 1)}), TooLarge, ErrorCode.TOO_LARGE
    )
    assert decode(_frames_with_body(M.Hello, {"agent": "é" * M.NAME_MAX})).msg.agent == "é" * 64


def _register(intervals: Any) -> list[bytes]:
    body = {"pid": 1, "start_time": 0, "intervals": intervals, "access": 1}
    return _frames_with_body(M.Register, body)


@pytest.mark.parametrize(
    "intervals",
    [
        [[8192, 4096]],  # reversed
        [[4096, 4096]],  # empty
        [[0, 4096], [4096, 0]],
        [[0, 0]],
        [[U64_MAX, U64_MAX]],
        [[U64_MAX, 0]],
    ],
)
def test_reversed_or_empty_intervals(intervals: Any) -> None:
    rejects(_register(intervals), DecodeError, ErrorCode.BAD_MESSAGE)


@pytest.mark.parametrize(
    "intervals",
    [
        [[0]],
        [[0, 1, 2]],
        [0, 4096],
        [{"start": 0, "end": 4096}],
        [[-4096, 0]],
        [[0, True]],
        [[0.0, 4096]],
        [["0", "4096"]],
        {"a": [0, 4096]},
        "0-4096",
        None,
    ],
)
def test_malformed_intervals(intervals: Any) -> None:
    rejects(_register(intervals), DecodeError, ErrorCode.BAD_MESSAGE)


def test_oversize_lists_are_too_large() -> None:
    rejects(_register([[0, 4096]] * (M.MAX_INTERVALS + 1)), TooLarge, ErrorCode.TOO_LARGE)
    assert len(decode(_register([[0, 4096]] * M.MAX_INTERVALS)).msg.intervals) == 64
    items = [[1, 0, 4096, 0]] * (M.MAX_ITEMS + 1)
    rejects(
        _frames_with_body(M.Invalidate, {"n": 1, "mirror": 1, "items": items}),
        TooLarge,
        ErrorCode.TOO_LARGE,
    )
    mirrors = [1] * ((1 << 16) + 1)
    rejects(
        _frames_with_body(M.Evicted, {"mirrors": mirrors, "reason": "r"}),
        TooLarge,
        ErrorCode.TOO_LARGE,
    )
    stats = {f"k{i}": i for i in range(257)}
    rejects(_frames_with_body(M.StatusReply, {"stats": stats}), TooLarge, ErrorCode.TOO_LARGE)


@pytest.mark.parametrize(
    "items",
    [[[1, 2, 3]], [[1, 2, 3, 4, 5]], [[1, 2, 3, -4]], [[1, 2, 3, True]], [5], "x"],
)
def test_malformed_items(items: Any) -> None:
    rejects(
        _frames_with_body(M.Invalidate, {"n": 1, "mirror": 1, "items": items}),
        DecodeError,
        ErrorCode.BAD_MESSAGE,
    )


@pytest.mark.parametrize("mirrors", [[-1], [True], [1.5], ["1"], [[1]], 1])
def test_malformed_uints(mirrors: Any) -> None:
    rejects(
        _frames_with_body(M.Evicted, {"mirrors": mirrors, "reason": "r"}),
        DecodeError,
        ErrorCode.BAD_MESSAGE,
    )


@pytest.mark.parametrize(
    "stats",
    [
        {"k": True},
        {"k": None},
        {"k": [1]},
        {"k": {"a": 1}},
        {"k": b"x"},
        {"k" * 65: 1},
        {"k": "v" * 257},
        [1, 2],
        "s",
    ],
)
def test_malformed_stats(stats: Any) -> None:
    rejects(_frames_with_body(M.StatusReply, {"stats": stats}), DecodeError, ErrorCode.BAD_MESSAGE)


def test_stats_bytes_key_rejected() -> None:
    body = msgpack.packb({"stats": {b"k": 1}})
    rejects([b"", msgpack.packb(hdr("status_reply")), body], DecodeError, ErrorCode.BAD_MESSAGE)


# --- rejections: bulk -----------------------------------------------------------------------


@pytest.mark.parametrize("cls", BULKY, ids=lambda c: c.TYPE)
def test_wrong_bulk_count_or_size(cls: type[M.Message]) -> None:
    msg = _small(cls)
    good = frames_of(msg)
    decode(good)
    head = good[:3]
    bulk = good[3:]
    rejects(head, DecodeError, ErrorCode.BAD_MESSAGE)  # no bulk at all
    rejects([*good, b""], DecodeError, ErrorCode.BAD_MESSAGE)  # one too many
    rejects([*good, bulk[-1]], DecodeError, ErrorCode.BAD_MESSAGE)
    if len(bulk) > 1:
        rejects([*head, bulk[0]], DecodeError, ErrorCode.BAD_MESSAGE)
        rejects([*head, bulk[1], bulk[0]], DecodeError, ErrorCode.BAD_MESSAGE)  # swapped
    for i in range(len(bulk)):
        for delta in (-1, +1, -len(bulk[i])):
            frames = list(good)
            frames[3 + i] = bytes(len(bulk[i]) + delta)
            rejects(frames, DecodeError, ErrorCode.BAD_MESSAGE)


def test_bulk_npages_zero_takes_empty_frames() -> None:
    msg = M.DmaWrite(mirror=1, start=0, npages=0)
    assert decode(frames_of(msg)).msg == msg
    rejects([*frames_of(msg)[:3], b"", b"\x00"], DecodeError, ErrorCode.BAD_MESSAGE)


def test_encode_refuses_wrong_bulk_count() -> None:
    with pytest.raises(ValueError):
        encode(M.FaultReply(mirror=1, start=0, npages=1, seq=0), id=1)
    with pytest.raises(ValueError):
        encode(M.Ok(), id=1, bulk=[b"x"])


# --- error classes --------------------------------------------------------------------------


def test_error_codes_of_the_exception_classes() -> None:
    assert ProtocolError.code == ErrorCode.BAD_MESSAGE
    assert DecodeError.code == ErrorCode.BAD_MESSAGE
    assert TooLarge.code == ErrorCode.TOO_LARGE
    assert VersionError.code == ErrorCode.VERSION_MISMATCH
    assert UnknownMessage.code == ErrorCode.UNKNOWN_MESSAGE
    assert issubclass(TooLarge, DecodeError)
    assert ErrorCode.EFAULT == 14 and ErrorCode.EPERM == 1 and ErrorCode.EBUSY == 16


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.binary(max_size=64), max_size=6))
def test_decode_of_garbage_raises_only_protocol_errors(frames: list[bytes]) -> None:
    try:
        decode(frames)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)


@settings(max_examples=300, deadline=None)
@given(
    cls=st.sampled_from(M.ALL_MESSAGES),
    data=st.data(),
)
def test_decode_of_mutated_frames_raises_only_protocol_errors(
    cls: type[M.Message], data: st.DataObject
) -> None:
    msg = data.draw(message_strategy(cls))
    frames = [bytearray(f) for f in encode(msg, id=1, bulk=bulk_for(msg, 0))]
    i = data.draw(st.integers(1, len(frames) - 1))
    op = data.draw(st.sampled_from(["flip", "truncate", "append"]))
    f = frames[i]
    if op == "flip" and f:
        pos = data.draw(st.integers(0, len(f) - 1))
        f[pos] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        del f[data.draw(st.integers(0, len(f))) :]
    else:
        f += data.draw(st.binary(min_size=1, max_size=8))
    try:
        decode([bytes(x) for x in frames])
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)


# --- entries.prot_bytes against dmirror_mkentry ---------------------------------------------

V, W, ERR = E.HMM_PFN_VALID, E.HMM_PFN_WRITE, E.HMM_PFN_ERROR
ZERO_PFN = 0x1234


def _order(o: int) -> int:
    return o << E.HMM_PFN_ORDER_SHIFT


def mkentry(entry: int, zero_pfn: int) -> int:
    """A transcription of lib/test_hmm.c ``dmirror_mkentry`` (no device-private pages)."""
    if entry & ERR:
        return E.HMM_DMIRROR_PROT_ERROR
    if not entry & V:
        return E.HMM_DMIRROR_PROT_NONE
    pfn = entry & E.HMM_PFN_PFN_MASK
    perm = E.HMM_DMIRROR_PROT_ZERO if zero_pfn and pfn == zero_pfn else E.HMM_DMIRROR_PROT_NONE
    perm |= E.HMM_DMIRROR_PROT_WRITE if entry & W else E.HMM_DMIRROR_PROT_READ
    order = (entry & E.HMM_PFN_ORDER_MASK) >> E.HMM_PFN_ORDER_SHIFT
    if order == E.PMD_ORDER:
        perm |= E.HMM_DMIRROR_PROT_PMD
    elif order == E.PUD_ORDER:
        perm |= E.HMM_DMIRROR_PROT_PUD
    return perm


@pytest.mark.parametrize(
    "entry,expected",
    [
        (0, 0x00),
        (77, 0x00),  # a PFN without VALID is nothing
        (W | 77, 0x00),
        (ERR, 0xFF),
        (ERR | V | W | 77, 0xFF),
        (ERR | _order(9), 0xFF),
        (V | 77, 0x01),
        (V | W | 77, 0x02),
        (V | ZERO_PFN, 0x11),
        (V | W | ZERO_PFN, 0x12),
        (V | 77 | _order(9), 0x05),
        (V | W | 77 | _order(9), 0x06),
        (V | ZERO_PFN | _order(9), 0x15),
        (V | 77 | _order(18), 0x09),
        (V | W | 77 | _order(18), 0x0A),
        (V | 77 | _order(1), 0x01),
        (_order(9) | 77, 0x00),
    ],
)
def test_prot_bytes_table(entry: int, expected: int) -> None:
    assert mkentry(entry, ZERO_PFN) == expected
    got = E.prot_bytes(np.array([entry], dtype=np.uint64), ZERO_PFN)
    assert got.dtype == np.uint8
    assert got.tolist() == [expected]


def test_prot_bytes_zero_pfn_unknown() -> None:
    got = E.prot_bytes(np.array([V | ZERO_PFN, V, V | W], dtype=np.uint64), 0)
    assert got.tolist() == [0x01, 0x01, 0x02]


@settings(max_examples=200, deadline=None)
@given(
    entries=st.lists(
        st.tuples(
            st.sampled_from([0, V, V | W, ERR, V | ERR, W]),
            st.sampled_from([0, 1, 9, 18, 31]),
            st.one_of(st.just(ZERO_PFN), st.integers(0, E.HMM_PFN_PFN_MASK)),
        ).map(lambda t: t[0] | _order(t[1]) | t[2]),
        max_size=64,
    ),
    zero_pfn=st.sampled_from([0, ZERO_PFN]),
)
def test_prot_bytes_matches_mkentry(entries: list[int], zero_pfn: int) -> None:
    got = E.prot_bytes(np.array(entries, dtype=np.uint64), zero_pfn)
    assert got.tolist() == [mkentry(e, zero_pfn) for e in entries]


def test_entries_wire_round_trip_and_length_check() -> None:
    table = np.array([V | 1, V | W | 2 | _order(9), ERR, 0], dtype=np.uint64)
    wire = E.to_wire(table)
    assert wire == b"".join(int(x).to_bytes(8, "little") for x in table)
    np.testing.assert_array_equal(E.from_wire(wire, 4), table)
    with pytest.raises(DecodeError):
        E.from_wire(wire[:-1], 4)
    with pytest.raises(DecodeError):
        E.from_wire(wire, 5)
    assert E.map_order(table).tolist() == [0, 9, 0, 0]
    assert E.pfns(table).tolist() == [1, 2, 0, 0]


def test_every_pid_field_is_a_u32() -> None:
    """A pid is a u32 on the wire wherever it appears (hello's was capped at 2^32, one over)."""
    pid_fields = [(cls, spec) for cls in M.ALL_MESSAGES for name, spec in wire_specs(cls)
                  if name == "pid"]  # fmt: skip
    assert pid_fields
    for cls, spec in pid_fields:
        assert spec.max == M.U32_MAX, cls.TYPE
        body = {**_valid_body(cls), "pid": 1 << 32}
        with pytest.raises(DecodeError):
            decode(_frames_with_body(cls, body))


# --- the uffd intake's line (SPEC.md §1.6) -----------------------------------------------------


def test_intake_line_round_trip_and_refusals() -> None:
    """What a target sends parses back to what it meant; any other option is refused."""
    for strict in (False, True):
        word, _, arg = intake.encode_line(strict).decode().partition(" ")
        assert word == intake.WORD
        assert intake.parse_option(arg) is strict
    with pytest.raises(ValueError, match=r"unknown option 'loose' of 'uffd' \(only 'strict'\)"):
        intake.parse_option("loose")


async def test_intake_both_ends_over_a_real_door(tmp_path: Any) -> None:
    """``offer`` (the target's end) through a Unix door to a handler of the ``uffd`` word
    that parses with ``parse_option``, as hmmd's does: the option arrives as ``strict``, the
    sender as its SO_PEERCRED, and a refusal comes back as the DoorError's reason."""
    taken: list[tuple[int | None, bool]] = []

    def on_line(peer: Peer, arg: str, fd: int, pidfd: int) -> str | None:
        try:
            strict = intake.parse_option(arg)
        except ValueError as exc:
            return str(exc)
        if strict:
            return "no strict offers today"
        taken.append((peer.pid, strict))
        os.close(fd)  # ours now: the test has no use for it
        return None

    path = str(tmp_path / "intake.sock")
    assert intake_path(f"ipc://{path}") == path
    door = Door.unix(path, {intake.WORD: on_line})
    read, write = os.pipe()
    try:
        await asyncio.to_thread(offer, path, read, strict=False, timeout=5.0)
        assert taken == [(os.getpid(), False)]
        with pytest.raises(DoorError, match="no strict offers today"):
            await asyncio.to_thread(offer, path, read, strict=True, timeout=5.0)
    finally:
        door.close()
        os.close(read)
        os.close(write)


def test_the_one_errno_map() -> None:
    """Codes valued as errnos stand for themselves both ways; TOO_LARGE and REMOTE_ACCESS
    stand for EINVAL and EACCES one way only (an EINVAL travels as EINVAL)."""
    for code in ErrorCode:
        if code < 100:
            assert ERRNO_OF_CODE[code] == int(code)
            assert CODE_OF_ERRNO[int(code)] is code
    assert ERRNO_OF_CODE[ErrorCode.TOO_LARGE] == errno.EINVAL
    assert ERRNO_OF_CODE[ErrorCode.REMOTE_ACCESS] == errno.EACCES
    assert CODE_OF_ERRNO[errno.EINVAL] is ErrorCode.EINVAL
    assert errno.EACCES not in CODE_OF_ERRNO
    assert ErrorCode.STALE not in ERRNO_OF_CODE
