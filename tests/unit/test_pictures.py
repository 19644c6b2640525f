"""The pictures' pieces without an hmmd: the ack histogram as ``status`` writes it and
hmmctl reads and draws it, the progress bar on a real pseudo-terminal and on a pipe, and
the live view's frame fitted to a terminal."""

from __future__ import annotations

import errno
import math
import os
import select
import time
from array import array

from hmmirror.daemon.histogram import STATUS_TEXT_MAX, AckHistogram, bucket_text, status_text
from hmmirror.daemon.invalidation import LatencyLog
from hmmirror.proto.ackbuckets import BOUNDS_S, bound_label, bound_seconds
from hmmirror.tools import ackhistogram
from hmmirror.tools.liveview import Reading, frame
from hmmirror.tools.progress import Progress, estimate_left, left_text, line


def test_the_status_text_counts_each_bucket_and_leaves_empty_ones_out() -> None:
    h = AckHistogram()
    h.observe_all([10.0, 25.0, 30.0, 30.0, 2000.0, 2e7])
    assert bucket_text(h) == "25us:2 50us:2 2.5ms:1 +Inf:1"
    assert bucket_text(AckHistogram()) == ""


class RingOnly:
    """A ``LatencyLog`` as it was before it fed a histogram: a ring and its count."""

    def __init__(self, size: int) -> None:
        self._ring = array("d", bytes(8 * size))
        self.recorded = 0

    def add(self, micros: float) -> None:
        self._ring[self.recorded % len(self._ring)] = micros
        self.recorded += 1


def test_status_text_follows_a_log_that_feeds_no_histogram() -> None:
    log = RingOnly(size=8)
    assert status_text(log) == ""
    for us in (10.0, 60.0, 60.0):
        log.add(us)
    assert status_text(log) == "25us:1 100us:2"
    log.add(3000.0)  # only the new sample is counted on the next call
    assert status_text(log) == "25us:1 100us:2 5ms:1"


def test_status_text_uses_the_logs_own_histogram_when_it_has_one() -> None:
    log = LatencyLog(size=8)
    for us in [10.0] * 20 + [400.0]:  # more than the ring holds: the histogram has them all
        log.add(us)
    assert isinstance(log.histogram, AckHistogram)
    assert status_text(log) == "25us:20 500us:1" == bucket_text(log.histogram)


def test_a_full_histogram_stays_within_a_status_strings_length() -> None:
    h = AckHistogram()
    h.observe_all([b * 1e6 for b in BOUNDS_S] + [1e8])
    exact = bucket_text(h)
    assert ackhistogram.parse(exact) == [(b, 1) for b in (*BOUNDS_S, math.inf)]
    h._counts = [10**9 + i for i in range(len(h._counts))]  # a billion in every bucket
    text = bucket_text(h)
    assert len(text) <= STATUS_TEXT_MAX
    parsed = dict(ackhistogram.parse(text))
    assert parsed[25e-6] == 10**9 and parsed[math.inf] == 10**9  # three digits: 1e+09


def test_hmmctls_ladder_and_labels_are_hmmds() -> None:
    assert (*BOUNDS_S, math.inf) == ackhistogram.LADDER_S
    for bound in BOUNDS_S:
        assert bound_seconds(bound_label(bound)) == bound
    named = [bound_label(b) for b in (25e-6, 2.5e-3, 1.0, math.inf)]
    assert named == ["25us", "2.5ms", "1s", "+Inf"]
    assert ackhistogram.as_json("25us:3 +Inf:1") == [
        {"le_s": 2.5e-05, "count": 3},
        {"le_s": None, "count": 1},
    ]


def test_the_drawing_keeps_empty_buckets_between_and_scales_bars() -> None:
    lines = ackhistogram.draw(ackhistogram.parse("25us:3 100us:12 +Inf:1"), width=12)
    assert len(lines) == len(BOUNDS_S) + 1  # 25us to 10s, then > 10s
    assert lines[0] == "  <=  25us  ###" + " " * 12 + "3"
    assert lines[1] == "  <=  50us  " + " " * 15 + "0"
    assert lines[2] == "  <= 100us  ############  12"
    assert lines[-1] == "  >    10s  #" + " " * 14 + "1"  # 1 of 12 still gets a cell
    assert ackhistogram.draw([]) == []
    assert ackhistogram.difference([(1e-3, 5), (1.0, 2)], [(1e-3, 5), (1.0, 1)]) == [(1.0, 1)]


def test_the_progress_line_says_what_is_done_and_what_is_left() -> None:
    text = line("check", 0.25, "round 3, 240/5000 ops", 12.4, 120)
    assert text.startswith("check  [##########..............................]")
    assert "25%  round 3, 240/5000 ops  ~12 s left" in text
    assert len(line("check", 0.5, "x" * 200, None, 60)) == 60
    assert left_text(None) == "" and left_text(125) == "~2:05 left"
    assert estimate_left(10.0, 0.25) == 30.0 and estimate_left(0.0, 0.0) is None


def _drive(bar: Progress) -> None:
    """What a run does with its bar: draw it, print a line beside it, end."""
    bar.update(0.5, "round 4", 3.0)
    with bar.aside():
        bar.stream.write("a line\n")  # type: ignore[union-attr]
    bar.close()


def _read_closed_pty(master: int, deadline: float = 10.0) -> bytes:
    """Everything written to a pty whose other end is closed: one ``read`` may return only
    part (the tty layer hands written bytes to the reader in pieces); EIO says it is all."""
    got = b""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if not select.select([master], [], [], max(0.0, end - time.monotonic()))[0]:
            break
        try:
            piece = os.read(master, 4096)
        except OSError as exc:
            if exc.errno == errno.EIO:
                return got
            raise
        if not piece:
            return got
        got += piece
    raise AssertionError(f"the pty gave {got!r} and no end in {deadline} s")


def test_the_progress_bar_draws_on_a_terminal() -> None:
    master, slave = os.openpty()
    with open(slave, "w") as tty:
        bar = Progress(tty, "demo")
        assert bar.enabled
        _drive(bar)
    drawn = _read_closed_pty(master).decode()
    os.close(master)
    shown = "\r\x1b[Kdemo  [####################....................]   50%  round 4  ~3 s left"
    # drawn, erased for the line, drawn again under it, erased at the end
    assert drawn == shown + "\r\x1b[Ka line\r\n" + shown + "\r\x1b[K"


def test_the_progress_bar_writes_nothing_on_a_pipe_nor_under_json() -> None:
    read_end, write_end = os.pipe()
    master, slave = os.openpty()
    with open(write_end, "w") as pipe, open(slave, "w") as tty:
        on_pipe, off = Progress(pipe, "demo"), Progress(tty, "demo", enabled=False)  # -j
        assert not on_pipe.enabled and not off.enabled
        _drive(on_pipe)
        _drive(off)
    with open(read_end) as f:
        assert f.read() == "a line\n"
    assert _read_closed_pty(master) == b"a line\r\n"
    os.close(master)


def test_a_frame_fits_the_terminal_and_shows_the_figures() -> None:
    status: dict[str, int | float | str] = {
        "epoch": "e1", "uptime_s": 10.0, "sessions": 2, "mms": 1, "mirrors": 2,
        "invalidations": 100, "faults": 4, "dma_reads": 1, "dma_writes": 1, "evictions": 1,
        "stale": 0, "ack_p50_us": 40.0, "ack_p99_us": 90.0, "ack_p999_us": 95.0,
        "ack_histogram": "50us:80 100us:20",
    }  # fmt: skip
    prev = Reading({**status, "uptime_s": 8.0, "invalidations": 60, "ack_histogram": "50us:60"})
    mms = [{"pid": 7, "start_time": 1, "seq": 8, "active": 1, "mirrors": 2, "uffd": 1}]
    mirrors: list[dict[str, int | str]] = [
        {"mirror": m, "agent": f"agent-{m}", "session": m, "pid": 7, "lo": 4096, "hi": 8192,
         "held_pages": 1, "access": 3, "flags": 0} for m in (1, 2)
    ]  # fmt: skip
    now = Reading(status, mms, mirrors)
    lines = frame(now, prev, title="top", width=70, height=30, footer="q quits")
    assert len(lines) == 30 and all(len(x) <= 70 for x in lines)
    text = "\n".join(lines)
    assert "sessions 2  mms 1  mirrors 2  in flight 1  evictions 1" in text
    assert "per second  invalidations 20  faults 0  dma 0" in text
    assert "\n  the last 2.0 s: 40 round trips\n" in text  # 20 + 20 since the previous reading
    assert "agent-2" in text and "proc+uffd" in text and lines[-1] == "q quits"
    short = frame(now, prev, title="top", width=70, height=12, footer="q quits")
    assert len(short) == 12 and short[-2].endswith("more lines (a taller terminal)")
    hidden = frame(Reading(status, hidden="PERMISSION_DENIED"), None, title="t", height=40)
    assert "in flight ?" in hidden[1] and any("no tables: PERMISSION_DENIED" in x for x in hidden)
