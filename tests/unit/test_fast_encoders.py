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
