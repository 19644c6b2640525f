"""The ack round trip as cumulative histogram buckets, for ``/metrics``.

``LatencyLog`` (``invalidation``) keeps a ring of the last round trips for the
percentiles ``hmmctl status`` shows; a ring cannot give Prometheus what it
needs (counts since the start, which ``rate()`` and ``histogram_quantile()``
turn into any window's quantiles). ``AckHistogram.observe`` costs one bisect
and two additions per ack, so the hot path may call it.

``RingFollower`` builds the same histogram from the ring alone, scrape by
scrape, for an hmmd whose ``LatencyLog`` does not feed one.

``status_text`` is the histogram as ``status`` gives it (``ack_histogram``):
one string, ``"25us:3 50us:10 2.5ms:1"``: the count in each bucket by its
upper bound (not cumulative: what a text histogram draws; empty buckets left
out, to stay within a status string's 256 characters), so that ``hmmctl
status`` can draw it without a scrape of ``/metrics``.
"""

from __future__ import annotations

import math
import weakref
from array import array
from bisect import bisect_left
from collections.abc import Sequence

import numpy as np
from hmmirror.proto.ackbuckets import BOUNDS_S, bound_label

#: The longest string a ``status`` value may be (SPEC §4.5, ``proto.schema``).
STATUS_TEXT_MAX = 256


class AckHistogram:
    """Counts of round trips per bucket, and their sum, since hmmd started."""

    def __init__(self, bounds_s: Sequence[float] = BOUNDS_S) -> None:
        self.bounds_s = tuple(float(b) for b in bounds_s)
        if list(self.bounds_s) != sorted(set(self.bounds_s)) or not self.bounds_s:
            raise ValueError("histogram bounds must be distinct and ascending")
        # The bounds in µs (what ``observe`` is given), rounded so that 25 µs lands in
        # le="2.5e-05" despite 25e-6 * 1e6 being 24.999999999999996.
        self._bounds_us = [round(b * 1e6, 6) for b in self.bounds_s]
        self._counts = [0] * (len(self.bounds_s) + 1)  # the last: above every bound
        self._sum_us = 0.0

    def observe(self, us: float) -> None:
        """Count one round trip of ``us`` microseconds."""
        self._counts[bisect_left(self._bounds_us, us)] += 1
        self._sum_us += us

    def observe_all(self, values_us: Sequence[float]) -> None:
        """Count each of ``values_us`` (up to a ring's 65,536 at once: vectorised)."""
        values = np.asarray(values_us, dtype=np.float64)
        if not values.size:
            return
        where = np.searchsorted(self._bounds_us, values, side="left")  # bisect_left's rule
        for i, n in enumerate(np.bincount(where, minlength=len(self._counts)).tolist()):
            self._counts[i] += n
        self._sum_us += float(values.sum())

    @property
    def count(self) -> int:
        """How many round trips were counted."""
        return sum(self._counts)

    @property
    def sum_seconds(self) -> float:
        """Their total, in seconds."""
        return self._sum_us / 1e6

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, count of round trips ≤ le)`` per bound, ending with ``(inf, count)``."""
        out, running = [], 0
        for bound, n in zip((*self.bounds_s, math.inf), self._counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class RingFollower:
    """An ``AckHistogram`` fed, at each scrape, with the samples a ring gained since the
    last one.

    ``ring`` is the ring's storage (an ``array('d')`` written at ``count % len``) and
    ``recorded()`` how many were ever written. Samples overwritten between two scrapes
    (more than the ring's size of acks in one scrape interval) are not counted, so
    the histogram may count fewer acks than hmmd saw; the hook in ``LatencyLog`` that
    calls ``observe`` directly has no such gap.
    """

    def __init__(self, ring: array[float], histogram: AckHistogram | None = None) -> None:
        self.ring = ring
        self.histogram = histogram or AckHistogram()
        self.seen = 0
        #: Round trips the ring had overwritten before a scrape could read them.
        self.missed = 0

    def catch_up(self, recorded: int) -> AckHistogram:
        """Count the samples written since the last call; return the histogram."""
        if recorded < self.seen:  # the log was reset: start following it again
            self.seen = 0
        size = len(self.ring)
        new = recorded - self.seen
        if new > size:
            self.missed += new - size
            new = size
        start = (recorded - new) % size
        if start + new <= size:
            self.histogram.observe_all(self.ring[start : start + new])
        else:
            self.histogram.observe_all(self.ring[start:])
            self.histogram.observe_all(self.ring[: start + new - size])
        self.seen = recorded
        return self.histogram


def bucket_text(histogram: AckHistogram) -> str:
    """``histogram``'s per-bucket counts as one string, empty buckets left out:
    ``"25us:3 50us:10 2.5ms:1"`` ("" when nothing was counted).

    A status string holds at most ``STATUS_TEXT_MAX`` characters (SPEC §4.5); should
    exact counts not fit (millions in every bucket at once), counts of a million or
    more are given to three significant digits (``1.23e+06``).
    """
    pairs, previous = [], 0
    for bound, running in histogram.cumulative():
        if running > previous:
            pairs.append((bound_label(bound), running - previous))
        previous = running
    text = " ".join(f"{label}:{n}" for label, n in pairs)
    if len(text) > STATUS_TEXT_MAX:
        text = " ".join(f"{label}:{n if n < 10**6 else format(n, '.3g')}" for label, n in pairs)
    return text


#: The follower of each ``LatencyLog`` that feeds no histogram of its own, for ``status``
#: (weak: a log that goes away takes its follower with it).
_FOLLOWERS: weakref.WeakKeyDictionary[object, RingFollower] = weakref.WeakKeyDictionary()


def status_text(latency: object) -> str:
    """The ack round trip histogram of ``latency`` (an ``invalidation.LatencyLog``) as
    ``bucket_text`` writes it: its own ``histogram`` when it feeds one, else its ring,
    followed from one ``status`` to the next (``RingFollower``, as ``/metrics`` does)."""
    hook = getattr(latency, "histogram", None)
    if isinstance(hook, AckHistogram):
        return bucket_text(hook)
    ring = getattr(latency, "_ring", None)
    recorded = getattr(latency, "recorded", None)
    if not (isinstance(ring, array) and isinstance(recorded, int)):
        return bucket_text(AckHistogram())
    follower = _FOLLOWERS.get(latency)
    if follower is None or follower.ring is not ring:
        follower = _FOLLOWERS[latency] = RingFollower(ring)
    return bucket_text(follower.catch_up(recorded))
