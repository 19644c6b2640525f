"""hmmd's ring of invalidation round trips: right percentiles, constant memory."""

from __future__ import annotations

import tracemalloc

from hmmirror.daemon.invalidation import LatencyLog


def test_percentiles_cover_the_last_size_round_trips() -> None:
    log = LatencyLog(size=100)
    assert log.percentiles(50, 99) == [0.0, 0.0]
    for i in range(250):
        log.add(float(i))
    p0, p50, p100 = log.percentiles(0, 50, 100)
    assert (p0, p100) == (150.0, 249.0)
    assert p50 == 199.5
    log.reset()
    assert log.percentiles(50) == [0.0]


def test_filling_the_ring_allocates_nothing() -> None:
    """Each round trip is a fresh float: the ring must keep its value, not the object.

    A list ring kept one float object (24 bytes) per slot alive, so hmmd's RSS grew by
    ~1.5 MB until the first 65,536 invalidations had passed.
    """
    log = LatencyLog()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1 << 16):
            log.add(i * 1.5)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"filling the ring kept {grown} bytes"
    assert log.percentiles(100) == [(65535 * 1.5)]
