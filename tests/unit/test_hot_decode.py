"""The decoder's fast path for ACK and INVALIDATE must give exactly what the general path gives.

``codec.decode`` reads the round trip's two messages, in the form the hot encoders write
them, without the general header and body walk. Whatever the bytes, the result (the
envelope, or the exception with its type, message and id) must be the general path's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import pytest
from hmmirror.proto import codec, decode
from hmmirror.proto.codec import Envelope, encode, encode_ack, encode_invalidate
from hmmirror.proto.errors import ProtocolError
from hmmirror.proto.messages import Ack, Invalidate, Ok
from hmmirror.proto.version import PROTOCOL_VERSION
from hypothesis import given
from hypothesis import strategies as st

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
items = st.lists(st.tuples(u64, u64, u64, st.integers(0, 8)), max_size=8)


@contextmanager
def general_path_only() -> Iterator[None]:
    """Switch the fast path off: ``decode`` then takes the general path for everything."""
    saved = codec._decode_hot
    codec._decode_hot = lambda frames: None
    try:
        yield
    finally:
        codec._decode_hot = saved


def outcome(frames: list[Any]) -> tuple[str, Any]:
    """What ``decode`` makes of ``frames``: the envelope, or the error it raised."""
    try:
        return "ok", decode(frames)
    except ProtocolError as exc:
        return "error", (type(exc), str(exc), exc.id, exc.code)


def same_as_general(frames: list[Any]) -> tuple[str, Any]:
    fast = outcome(frames)
    with general_path_only():
        slow = outcome(frames)
    assert fast == slow
    return fast


@given(n=u64, msg_id=u64)
def test_ack_fast_path_matches_general_path(n: int, msg_id: int) -> None:
    kind, env = same_as_general(encode_ack(n, msg_id))
    assert kind == "ok" and env == Envelope("ack", msg_id, 0, PROTOCOL_VERSION, Ack(n=n), ())
    assert codec._decode_hot(encode_ack(n, msg_id)) == env  # it did take the fast path


@given(n=u64, mirror=u64, its=items, msg_id=u64)
def test_invalidate_fast_path_matches_general_path(
    n: int, mirror: int, its: list[tuple[int, int, int, int]], msg_id: int
) -> None:
    frames = encode_invalidate(n, mirror, msgpack.packb(its), msg_id)
    kind, env = same_as_general(frames)
    assert kind == "ok" and env.msg == Invalidate(n=n, mirror=mirror, items=tuple(its))
    assert codec._decode_hot(frames) == env


def test_zmq_frames_take_the_fast_path() -> None:
    zmq = pytest.importorskip("zmq")
    frames = [zmq.Frame(f) for f in encode_ack(7, 9)]
    assert codec._decode_hot(frames) == decode(encode_ack(7, 9))


@given(
    n=u64,
    msg_id=u64,
    frame=st.integers(0, 2),
    cut=st.integers(0, 40),
    junk=st.binary(max_size=6),
)
def test_mangled_ack_matches_general_path(
    n: int, msg_id: int, frame: int, cut: int, junk: bytes
) -> None:
    """Truncated, extended or corrupted ACKs: the same verdict either way."""
    frames = encode_ack(n, msg_id)
    b = frames[frame]
    frames[frame] = b[:cut] + junk + b[cut + len(junk) :]
    same_as_general(frames)


@given(
    n=u64,
    its=items,
    msg_id=u64,
    frame=st.integers(0, 2),
    cut=st.integers(0, 80),
    junk=st.binary(max_size=6),
)
def test_mangled_invalidate_matches_general_path(
    n: int, its: list[tuple[int, int, int, int]], msg_id: int, frame: int, cut: int, junk: bytes
) -> None:
    frames = encode_invalidate(n, 3, msgpack.packb(its), msg_id)
    b = frames[frame]
    frames[frame] = b[:cut] + junk + b[cut + len(junk) :]
    same_as_general(frames)


@pytest.mark.parametrize(
    "body",
    [
        {"n": -1},
        {"n": 1.0},
        {"n": True},
        {"n": 1, "extra": "ignored"},
        {},
        {"n": (1,)},
        {"n": 1, "mirror": 2, "items": ((1, 2, 3, 4),)},
    ],
)
def test_odd_ack_bodies_match_general_path(body: dict[str, Any]) -> None:
    frames = encode_ack(1, 5)
    frames[2] = msgpack.packb(body)
    same_as_general(frames)


@pytest.mark.parametrize(
    "body",
    [
        {"n": 1, "mirror": 2},
        {"n": 1, "mirror": -2, "items": ()},
        {"n": 1, "mirror": 2, "items": ((1, 2, 3),)},
        {"n": 1, "mirror": 2, "items": ((1, 2, 3, -4),)},
        {"n": 1, "mirror": 2, "items": ((1, 2, 3, True),)},
        {"n": 1, "mirror": 2, "items": (b"abcd",)},
        {"n": 1, "mirror": 2, "items": ((0, 0, 0, 0),) * 4097},
        {"n": 1, "mirror": 2, "items": (), "extra": 1},
        {"n": 1, "mirror": 2, "items": ((1, 2, 3, 0),), "mirrors": (2,)},
        {"n": 1, "mirror": 2, "items": ((1, 2, 3, 0),), "mirrors": (3,)},
        {"n": "1", "mirror": 2, "items": ()},
    ],
)
def test_odd_invalidate_bodies_match_general_path(body: dict[str, Any]) -> None:
    frames = encode_invalidate(1, 2, msgpack.packb(()), 5)
    frames[2] = msgpack.packb(body)
    same_as_general(frames)


def test_non_canonical_integers_read_the_same() -> None:
    """A u64 packed wider than it needs (still valid msgpack) means the same id and n."""
    frames = encode_ack(5, 6)
    frames[2] = b"\x81\xa1n\xcf" + (5).to_bytes(8, "big")
    head = frames[1]
    frames[1] = head[: -len(b"\x06\xa2re\x00")] + b"\xd3" + (6).to_bytes(8, "big") + b"\xa2re\x00"
    kind, env = same_as_general(frames)
    assert kind == "ok" and (env.id, env.msg) == (6, Ack(n=5))


def test_other_messages_take_the_general_path() -> None:
    frames = encode(Ok(), 3, re=2)
    assert codec._decode_hot(frames) is None
    assert decode(frames).msg == Ok()
