"""``watch.proc.union``: the ranges a watcher reads (pagemap) or walks (VMAs to register).

The watchers take the union of an mm's mirrors' ranges rather than each, so an mm
mirrored by eight agents over one range costs one read or walk, not eight. The union
must hold exactly the addresses of its input, as sorted disjoint ranges that
do not touch (touching ones merge: a VMA meets [a, c) exactly when it meets
[a, b) or [b, c)), whatever the order, overlaps and empty ranges of the input.
"""

from __future__ import annotations

from itertools import pairwise

from hmmirror.daemon.watch.proc import union
from hypothesis import given, settings
from hypothesis import strategies as st

bounds = st.tuples(st.integers(0, 64), st.integers(0, 64))


@settings(max_examples=400, deadline=None)
@given(st.lists(bounds, max_size=12))
def test_the_union_holds_exactly_the_addresses_of_its_ranges(ranges: list[tuple[int, int]]) -> None:
    out = union(ranges)
    wanted = {a for lo, hi in ranges for a in range(lo, hi)}
    assert {a for lo, hi in out for a in range(lo, hi)} == wanted
    assert all(lo < hi for lo, hi in out)
    assert all(a[1] < b[0] for a, b in pairwise(out))  # sorted, apart


def test_eight_mirrors_of_one_range_are_one_walk() -> None:
    span = (0x7F00_0000_0000, 0x7F00_0040_0000)
    assert union([span] * 8) == [span]
    assert union([(0, 4), (4, 8), (10, 12), (11, 11), (9, 9)]) == [(0, 8), (10, 12)]
