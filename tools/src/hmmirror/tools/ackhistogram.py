"""The ack round trip histogram as hmmctl reads and draws it.

hmmd's ``status`` carries ``ack_histogram``, one string of per-bucket counts by
upper bound (``"25us:3 50us:10 2.5ms:1"``, empty buckets left out; SPEC §4.5).
``parse`` turns it into ``(bound in seconds, count)`` pairs, ``as_json`` into
what ``hmmctl status -j`` prints, ``difference`` gives the round trips between
two readings (``hmmctl top``'s last interval) and ``draw`` the text histogram of
``hmmctl status`` and the live view: one bar per bucket from the first non-empty
to the last, empty ones between included so that the shape is not squeezed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hmmirror.proto.ackbuckets import BOUNDS_S, bound_label, bound_seconds

Buckets = list[tuple[float, int]]

#: hmmd's bucket bounds in seconds, ``+Inf`` last; they fill the empty buckets that the
#: status string leaves out.
LADDER_S = (*BOUNDS_S, math.inf)


def parse(text: str) -> Buckets:
    """``"25us:3 50us:10"`` as ``[(2.5e-05, 3), (5e-05, 10)]``, by bound; ValueError if
    malformed. Counts hmmd shortened to three digits (``1.23e+06``) come back whole."""
    buckets: dict[float, int] = {}
    for item in text.split():
        name, sep, count = item.partition(":")
        if not sep:
            raise ValueError(f"not a bucket: {item!r}")
        buckets[bound_seconds(name)] = int(float(count))
    return sorted(buckets.items())


def as_json(text: str) -> list[dict[str, float | int | None]]:
    """``hmmctl status -j``'s ``ack_histogram``: ``[{"le_s": 2.5e-05, "count": 3}, ...]``,
    ``le_s`` null for the bucket above every bound (+Inf)."""
    return [
        {"le_s": None if math.isinf(bound) else bound, "count": count}
        for bound, count in parse(text)
    ]


def difference(now: Buckets, before: Buckets) -> Buckets:
    """The round trips counted in ``now`` and not yet in ``before`` (an earlier reading)."""
    earlier = dict(before)
    return [(b, n - earlier.get(b, 0)) for b, n in now if n > earlier.get(b, 0)]


def span(buckets: Buckets) -> Buckets:
    """``buckets`` from the first non-empty to the last, with the empty ones of the ladder
    between them ([] when all are empty)."""
    counts = {b: n for b, n in buckets if n > 0}
    if not counts:
        return []
    lo, hi = min(counts), max(counts)
    bounds = sorted({*counts, *(b for b in LADDER_S if lo <= b <= hi)})
    return [(b, counts.get(b, 0)) for b in bounds]


def draw(buckets: Buckets, width: int = 40, block: str = "#") -> list[str]:
    """One line per bucket: ``  <=  25us  ######....  1234``, bars scaled to the largest
    (``width`` cells), a bucket with any count at least one cell wide."""
    rows = span(buckets)
    if not rows:
        return []
    top = max(n for _, n in rows)
    digits = len(str(top))
    names = [bound_label(LADDER_S[-2] if math.isinf(b) else b) for b, _ in rows]
    wide = max(len(n) for n in names)
    lines = []
    for name, (bound, n) in zip(names, rows, strict=True):
        cells = 0 if n == 0 else max(1, round(n / top * width))
        sign = "> " if math.isinf(bound) else "<="
        lines.append(f"  {sign} {name:>{wide}}  {block * cells:<{width}}  {n:>{digits}}")
    return lines


def block_for(encoding: str | None) -> str:
    """The bar's cell: a full block where the stream writes UTF-8, else ``#``."""
    return "\u2588" if (encoding or "").lower().replace("-", "") == "utf8" else "#"


def summary(buckets: Sequence[tuple[float, int]]) -> str:
    """``"1234 round trips"`` (or ``"no round trips"``): the histogram's total."""
    total = sum(n for _, n in buckets)
    return f"{total} round trip{'s' * (total != 1)}" if total else "no round trips"
