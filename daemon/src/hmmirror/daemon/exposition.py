"""What hmmd's ``/metrics`` says: a prometheus_client collector over ``status()``.

The hot path keeps counting in plain ints (``Daemon.counters``, the parts'
own attributes); only a scrape reads them, through ``Daemon.status()``, and
``StatusCollector`` turns that dict into metric families with HELP, TYPE,
``_total`` on counters and base units (``_seconds``, ``_bytes``). The ack
round trip is a histogram (``histogram.AckHistogram``), build facts an info
metric, and ``registry()`` adds prometheus_client's ``ProcessCollector``
(CPU, memory, fds, start time). Figures that are no use as a time series
(the pid, the epoch, monotonic timestamps, uptime, ring percentiles) are left
out; the zero page's frame number never leaves hmmd.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hmmirror.daemon import version
from hmmirror.daemon.histogram import AckHistogram, RingFollower
from hmmirror.proto.version import PROTOCOL_VERSION
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

Figures = Callable[[], dict[str, int | float | str]]

PREFIX = "hmmirror_"


@dataclass(frozen=True)
class Figure:
    """How one status figure is exposed: name (without ``hmmirror_`` and ``_total``)."""

    name: str
    counter: bool
    help: str
    unit: str = ""


def _c(name: str, help: str) -> Figure:
    """A counter (exposed with ``_total``)."""
    return Figure(name, True, help)


def _g(name: str, help: str, unit: str = "") -> Figure:
    """A gauge; ``unit`` (OpenMetrics' UNIT) when its name ends in one."""
    return Figure(name, False, help, unit)


#: Every numeric status figure that is exposed, by its key in ``Daemon.status()``.
FIGURES: dict[str, Figure] = {
    "sessions": _g("sessions", "Agent sessions open (fenced ones not counted)."),
    "mms": _g("mms", "Processes (address spaces) with at least one mirror."),
    "mirrors": _g("mirrors", "Mirrors registered."),
    "uffd_watched": _g("uffd_watched", "Mirrored processes watched through a userfaultfd."),
    "watch_lag_s": _g(
        "watch_lag_seconds", "Largest delay of a watcher behind its process's changes.", "seconds"
    ),
    "reply_bytes": _g("reply_bytes", "Bytes of replies queued for all connections.", "bytes"),
    "copy_threads": _g("copy_threads", "DMA copy worker threads running."),
    "copy_stuck": _g("copy_stuck", "DMA copy workers blocked in a target's page fault."),
    "messages": _c("messages", "Messages received from agents."),
    "bad_messages": _c("bad_messages", "Messages refused as malformed or out of place."),
    "faults": _c("faults", "FAULT requests served."),
    "dma_reads": _c("dma_reads", "DMA reads served."),
    "dma_writes": _c("dma_writes", "DMA writes served."),
    "dma_atomics": _c("dma_atomics", "DMA atomics served."),
    "invalidations": _c("invalidations", "Invalidations sent out (one per change announced)."),
    "stale": _c("stale", "DMA requests refused STALE (a translation older than a change)."),
    "evictions": _c("evictions", "Sessions evicted (missed ack deadline, lease, reply cap)."),
    "reply_evictions": _c("reply_evictions", "Sessions evicted for exceeding the reply cap."),
    "releases": _c("releases", "Mirrors released (their process exited or was replaced)."),
    "registrations": _c("registrations", "Mirrors registered since the start."),
    "refusals": _c("refusals", "Requests refused PERMISSION_DENIED by the access rules."),
    "moved": _c("moved", "Requests refused MOVED: another hmmd of the host owns the process."),
    "mirror_refusals": _c(
        "mirror_refusals", "Registrations refused TOO_LARGE: past a peer's or hmmd's mirror caps."
    ),
    "claims": _g("claims", "Processes this hmmd owns among the host's hmmds (owners_dir)."),
    "reply_refusals": _c("reply_refusals", "Requests refused because replies were over cap."),
    "uffd_events": _c("uffd_events", "Userfaultfd events read by the watchers."),
    "strict_write_faults": _c(
        "strict_write_faults", "Stores held until strict mirrors acked WRITTEN."
    ),
    "written_runs": _c("written_runs", "Runs of written pages announced by uffd watchers."),
    "uffd_refusals": _c("uffd_refusals", "Userfaultfds offered by targets and refused."),
    "copy_timeouts": _c("copy_timeouts", "DMA copies that outlived copy_deadline."),
    "copy_refused": _c("copy_refused", "DMA copies refused EBUSY before they started."),
    "windows": _g("dma_windows", "Shared-memory DMA windows mapped (SPEC 4.9)."),
    "window_bytes": _g("dma_window_bytes", "Bytes of the DMA windows mapped.", "bytes"),
    "windows_attached": _c("dma_windows_attached", "DMA windows attached since the start."),
    "window_refusals": _c("dma_window_refusals", "DMA windows refused at the door."),
    "window_reads": _c("dma_window_reads", "DMA reads served into a window."),
    "window_writes": _c("dma_window_writes", "DMA writes served from a window."),
}
#: Status figures deliberately not exposed (identity, clocks, strings, the zero page,
#: and the ring's percentiles that ``hmmirror_ack_round_trip_seconds`` replaces).
OMITTED = frozenset(
    {
        "epoch", "endpoint", "pid", "uptime_s", "metrics", "uffd_last_refusal", "zero_pfn",
        "ack_p50_us", "ack_p99_us", "ack_p999_us", "ack_samples", "last_acked_monotonic",
    }
)  # fmt: skip
#: The HELP of a numeric status figure that is in neither table: exposed as a gauge so
#: that nothing new is lost, and flagged so that a test notices it.
UNDESCRIBED = "An hmmd status figure not yet described in hmmirror.daemon.exposition."
ACK_HELP = "Round trip of an invalidation: sent until every mirror acked it."


class StatusCollector:
    """A prometheus_client collector: ``status()``'s figures, build info, ack histogram.

    ``latency`` is the ``Invalidator``'s ``LatencyLog``: its ``histogram`` attribute
    (an ``AckHistogram`` it feeds per ack) when it has one, else its ring, followed
    at each scrape (``histogram.RingFollower``).
    """

    def __init__(
        self, figures: Figures, latency: object | None, version: str, protocol: str
    ) -> None:
        self.figures = figures
        self.latency = latency
        self.build = {"version": version, "protocol": protocol}
        self._follower: RingFollower | None = None
        self._empty = AckHistogram()
        #: Per counter: its last value and what earlier drops took off. Some counters
        #: are sums over live processes (``uffd_events``) and shrink when one exits; a
        #: Prometheus counter must not, or ``rate()`` reads the drop as a reset.
        self._last: dict[str, tuple[float, float]] = {}

    def collect(self) -> Iterator[Metric]:
        """The families for one scrape."""
        yield InfoMetricFamily(
            PREFIX + "build", "hmmd's version and wire protocol version.", value=self.build
        )
        for key, value in sorted(self.figures().items()):
            if key in OMITTED or isinstance(value, str | bool):
                continue
            figure = FIGURES.get(key) or _g(key, UNDESCRIBED)
            name = PREFIX + figure.name
            if figure.counter:
                yield CounterMetricFamily(name, figure.help, value=self._monotonic(key, value))
            else:
                yield GaugeMetricFamily(name, figure.help, value=value, unit=figure.unit)
        yield self._ack_family()

    def _monotonic(self, key: str, value: float) -> float:
        """``value`` plus every earlier drop of ``key``: never less than the last scrape."""
        last, offset = self._last.get(key, (0.0, 0.0))
        if value < last:
            offset += last - value
        self._last[key] = (value, offset)
        return value + offset

    def _histogram(self) -> AckHistogram:
        """The ack histogram: the log's own, the ring followed, or an empty one."""
        hook = getattr(self.latency, "histogram", None)
        if isinstance(hook, AckHistogram):
            return hook
        ring = getattr(self.latency, "_ring", None)
        recorded = getattr(self.latency, "recorded", None)
        if isinstance(ring, array) and isinstance(recorded, int):
            if self._follower is None or self._follower.ring is not ring:
                self._follower = RingFollower(ring)
            return self._follower.catch_up(recorded)
        return self._empty

    def _ack_family(self) -> HistogramMetricFamily:
        """``hmmirror_ack_round_trip_seconds``: buckets, count and sum since the start."""
        hist = self._histogram()
        buckets = [
            ("+Inf" if math.isinf(le) else repr(le), float(n))  # repr: 2.5e-05, 0.001, 1.0
            for le, n in hist.cumulative()
        ]
        return HistogramMetricFamily(
            PREFIX + "ack_round_trip_seconds",
            ACK_HELP,
            buckets=buckets,
            sum_value=hist.sum_seconds,
            unit="seconds",
        )


def registry(figures: Figures, latency: object | None = None) -> CollectorRegistry:
    """A registry of hmmd's collector and the process collector (no global state)."""
    protocol = f"{PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}"
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatusCollector(figures, latency, version(), protocol))
    ProcessCollector(registry=reg)
    return reg
