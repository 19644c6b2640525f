"""The pieces behind /metrics without an hmmd: AckHistogram, RingFollower, StatusCollector.

These use hmmd's real ``LatencyLog`` and prometheus_client's real exposition.
"""

from __future__ import annotations

import math

import pytest
from hmmirror.daemon.exposition import StatusCollector, registry
from hmmirror.daemon.histogram import AckHistogram, RingFollower
from hmmirror.daemon.invalidation import LatencyLog
from hmmirror.proto.ackbuckets import BOUNDS_S
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families


def samples(text: bytes) -> dict[str, float]:
    return {
        s.name + ("" if "le" not in s.labels else f"[{s.labels['le']}]"): s.value
        for f in text_string_to_metric_families(text.decode())
        for s in f.samples
    }


def test_buckets_follow_le_at_each_bound_and_are_cumulative() -> None:
    h = AckHistogram()
    for us in (1.0, 25.0, 25.000001, 999.0, 1000.0, 1e7, 2e7):
        h.observe(us)
    got = dict(h.cumulative())
    assert got[25e-6] == 2  # 25 µs is counted in le="2.5e-05": "less or equal"
    assert got[50e-6] == 3
    assert got[1e-3] == 5
    assert got[10.0] == 6 and got[math.inf] == h.count == 7
    assert h.sum_seconds == pytest.approx((1 + 25 + 25.000001 + 999 + 1000 + 1e7 + 2e7) / 1e6)
    v = AckHistogram()
    v.observe_all([1.0, 25.0, 25.000001, 999.0, 1000.0, 1e7, 2e7])  # the vectorised path agrees
    assert v.cumulative() == h.cumulative() and v.sum_seconds == pytest.approx(h.sum_seconds)
    with pytest.raises(ValueError):
        AckHistogram((1.0, 0.5))


def test_the_ring_follower_counts_each_sample_once_across_wraps_and_resets() -> None:
    log = LatencyLog(size=8)
    follower = RingFollower(log._ring)
    expected = AckHistogram()
    for round_ in range(5):  # 5 samples per scrape into a ring of 8: it wraps
        for i in range(5):
            us = 10.0 ** (1 + (round_ + i) % 6)
            log.add(us)
            expected.observe(us)
        assert follower.catch_up(log.recorded).cumulative() == expected.cumulative()
    assert follower.missed == 0
    for _ in range(20):  # more than the ring holds between two scrapes
        log.add(100.0)
    assert follower.catch_up(log.recorded).count == expected.count + 8
    assert follower.missed == 12
    log.reset()
    log.add(7.0)
    assert follower.catch_up(log.recorded).count == expected.count + 9  # still cumulative


class RingOnlyLog(LatencyLog):
    """A LatencyLog without its histogram hook (as hmmd's was before it had one): the
    collector then follows the ring."""

    def __init__(self, size: int = 1 << 16) -> None:
        super().__init__(size)
        self.histogram = None  # type: ignore[assignment]

    def add(self, micros: float) -> None:
        self._ring[self._count % len(self._ring)] = micros
        self._count += 1


@pytest.mark.parametrize("log_class", [RingOnlyLog, LatencyLog])
def test_the_collector_reads_the_hook_or_follows_the_ring(log_class: type[LatencyLog]) -> None:
    log = log_class(size=4)
    reg = registry(lambda: {"invalidations": 0}, log)
    for _ in range(3):  # 3 rounds of 3 acks into a ring of 4, a scrape after each
        for us in (30.0, 300.0, 3000.0):
            log.add(us)
        got = samples(generate_latest(reg))
    assert got["hmmirror_ack_round_trip_seconds_count"] == 9
    assert got["hmmirror_ack_round_trip_seconds_bucket[5e-05]"] == 3
    assert got["hmmirror_ack_round_trip_seconds_bucket[0.0005]"] == 6
    assert got["hmmirror_ack_round_trip_seconds_sum"] == pytest.approx(3 * 3330e-6)
    if log_class is LatencyLog:  # its hook counts what the ring alone would lose
        for _ in range(10):
            log.add(30.0)
        assert samples(generate_latest(reg))["hmmirror_ack_round_trip_seconds_count"] == 19


def test_counters_never_go_down_and_gauges_do() -> None:
    figures = iter(
        [
            {"uffd_events": 10, "sessions": 3},
            {"uffd_events": 4, "sessions": 1},  # a watched process exited: its events went
            {"uffd_events": 9, "sessions": 2},
        ]
    )
    collector = StatusCollector(lambda: next(figures), None, "0", "1.0")
    seen = []
    for _ in range(3):
        families = {f.name: f for f in collector.collect()}
        seen.append(
            (families["hmmirror_uffd_events"].samples[0].value,
             families["hmmirror_sessions"].samples[0].value)
        )  # fmt: skip
    assert seen == [(10, 3), (10, 1), (15, 2)]
    # No latency log at all: the histogram is there, empty.
    ack = {s.name: s.value for s in families["hmmirror_ack_round_trip_seconds"].samples}
    assert ack["hmmirror_ack_round_trip_seconds_count"] == 0


def test_bounds_are_ascending_seconds_from_microseconds_to_seconds() -> None:
    assert list(BOUNDS_S) == sorted(BOUNDS_S)
    assert BOUNDS_S[0] == 25e-6 and BOUNDS_S[-1] == 10.0
