"""The hot-path encoders must produce exactly the bytes of the general encoder."""

from __future__ import annotations

import msgpack
from hmmirror.proto import decode, encode
from hmmirror.proto.codec import encode_ack, encode_invalidate
from hmmirror.proto.messages import Ack, Invalidate
from hypothesis import given
from hypothesis import strategies as st

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
items = st.lists(st.tuples(u64, u64, u64, st.integers(0, 8)), max_size=20)


@given(n=u64, mirror=u64, items=items, msg_id=u64)
def test_encode_invalidate_matches_general_encoder(n, mirror, items, msg_id):
    fast = encode_invalidate(n, mirror, msgpack.packb(items), msg_id)
    assert fast == encode(Invalidate(n=n, mirror=mirror, items=tuple(items)), msg_id)
    assert decode(fast).msg == Invalidate(n=n, mirror=mirror, items=tuple(items))


@given(n=u64, msg_id=u64)
def test_encode_ack_matches_general_encoder(n, msg_id):
    assert encode_ack(n, msg_id) == encode(Ack(n=n), msg_id)


@given(n=u64, items=st.lists(st.tuples(u64, u64, u64, st.integers(0, 8)), min_size=1, max_size=20),
       data=st.data(), msg_id=u64)  # fmt: skip
def test_encode_invalidate_over_several_mirrors_matches_general_encoder(n, items, data, msg_id):
    """1.2's ``mirrors``: one mirror per item, spliced in packed, read back as sent."""
    mirrors = data.draw(st.lists(u64, min_size=len(items), max_size=len(items)))
    msg = Invalidate(n=n, mirror=mirrors[0], items=tuple(items), mirrors=tuple(mirrors))
    fast = encode_invalidate(n, mirrors[0], msgpack.packb(items), msg_id, msgpack.packb(mirrors))
    assert fast == encode(msg, msg_id)
    assert decode(fast).msg == msg


def test_an_invalidate_without_mirrors_is_encoded_as_in_1_1():
    """The field 1.2 added is left out while empty: three keys, as before."""
    body = encode(Invalidate(n=1, mirror=2, items=((1, 2, 3, 0),)), 9)[2]
    assert msgpack.unpackb(body) == {"n": 1, "mirror": 2, "items": [[1, 2, 3, 0]]}
