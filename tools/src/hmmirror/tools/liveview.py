"""The live view: ``hmmctl top`` as a full-screen table, and the demo's live table.

A ``Reading`` is one look at hmmd (its ``status``, and its ``inventory`` when hmmd
shows it to us); ``frame`` turns two successive readings into the screen's lines:
sessions, mms, mirrors, invalidations in flight, rates, the ack round trip's
percentiles and histogram (``ackhistogram``), evictions, and the sessions,
mirrors and mms tables, cut to the terminal's height. ``Screen`` draws frames in
place on a terminal's alternate screen, with the terminal's own control strings
(terminfo, read through the standard library's ``curses.setupterm``, on any
stream: the demo's live table may be on stderr), and gives the screen back as it
was on exit, Ctrl-C or an error. ``top_screen`` is ``hmmctl top``'s loop: a
reading per interval, ``q`` quits, a resized terminal is redrawn at once.

Where the stream is not a terminal, or the terminal cannot place the cursor
(``TERM=dumb``), callers keep their line-per-interval output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import time
import tty
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from hmmirror.tools import ackhistogram
from hmmirror.transport.peer import printable

Figures = dict[str, int | float | str]
_WATCHED = {0: "proc", 1: "proc+uffd", 2: "proc+uffd+strict"}


@dataclass
class Reading:
    """One look at hmmd: its figures, and its tables unless hmmd keeps them from us."""

    status: Figures
    mms: list[dict[str, int]] | None = None
    mirrors: list[dict[str, int | str]] | None = None
    hidden: str = ""
    """Why there are no tables (hmmd shows them only to root and inspect grants)."""
    at: float = field(default_factory=time.time)


async def read_hmmd(endpoint: str, timeout: float, curve: Any = None) -> Reading:
    """A ``Reading`` of hmmd at ``endpoint``; AgentError if it does not answer."""
    from hmmirror.client.errors import RemoteError
    from hmmirror.client.session import inventory, status

    figures = await status(endpoint, timeout, curve)
    try:
        mms, mirrors = await inventory(endpoint, timeout, curve)
    except RemoteError as exc:
        return Reading(figures, hidden=str(exc))
    return Reading(figures, mms, mirrors)


def rate(prev: Figures, now: Figures, *keys: str) -> float | None:
    """Per-second rate of the summed counters ``keys`` between two status readings."""
    dt = float(now["uptime_s"]) - float(prev["uptime_s"])
    delta = sum(float(now.get(k, 0)) - float(prev.get(k, 0)) for k in keys)
    return round(delta / dt, 1) if dt > 0 else None


def table(heads: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns aligned under their heads (control characters a peer put in a name escaped)."""
    cells = [[printable(str(c)) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(heads)]  # fmt: skip
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _uptime(seconds: float) -> str:
    """``1:02:03`` (hours, minutes, seconds)."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _per_s(value: float | None) -> str:
    """A rate as a whole number, or ``-`` before there are two readings."""
    return "-" if value is None else f"{value:.0f}"


def _latency(now: Reading, prev: Reading | None, width: int, block: str) -> list[str]:
    """The ack round trip: percentiles, then the histogram of the last interval's round
    trips (or, when there were none, of all since hmmd started)."""
    s = now.status
    head = (
        f"ack round trip  p50 {s.get('ack_p50_us', '-')} us  p99 {s.get('ack_p99_us', '-')} us"
        f"  p99.9 {s.get('ack_p999_us', '-')} us"
    )
    text = str(s.get("ack_histogram", ""))
    try:
        buckets = ackhistogram.parse(text)
        before = ackhistogram.parse(str(prev.status.get("ack_histogram", ""))) if prev else []
    except ValueError:
        return [head, f"  (hmmd's ack_histogram is unreadable: {text[:60]!r})"]
    recent = ackhistogram.difference(buckets, before) if prev is not None else []
    if recent:
        dt = float(s["uptime_s"]) - float(prev.status["uptime_s"]) if prev else 0.0
        shown, what = recent, f"the last {dt:.1f} s: {ackhistogram.summary(recent)}"
    else:
        shown, what = buckets, f"since hmmd started: {ackhistogram.summary(buckets)}"
    bars = max(10, min(40, width - 30))
    return [head, f"  {what}", *ackhistogram.draw(shown, bars, block)]


def _tables(now: Reading) -> list[str]:
    """The sessions, mirrors and mms tables (or why hmmd shows none)."""
    if now.mms is None or now.mirrors is None:
        return [f"(no tables: {now.hidden})" if now.hidden else "(no tables)"]
    sessions: dict[tuple[int, str], list[int]] = {}
    for m in now.mirrors:
        held = sessions.setdefault((int(m["session"]), str(m["agent"])), [0, 0])
        held[0] += 1
        held[1] += int(m["held_pages"])
    rows = [(sid, name, n, held) for (sid, name), (n, held) in sorted(sessions.items())]
    out = [table(("SESSION", "AGENT", "MIRRORS", "PAGES HELD"), rows)]
    out.append(table(
        ("MIRROR", "AGENT", "SESSION", "PID", "RANGE", "PAGES HELD", "ACCESS"),
        [(m["mirror"], m["agent"], m["session"], m["pid"],
          f"{int(m['lo']):#x}-{int(m['hi']):#x}", m["held_pages"],
          "rw" if int(m["access"]) & 2 else "r") for m in now.mirrors],
    ))  # fmt: skip
    out.append(table(
        ("PID", "SEQ", "IN FLIGHT", "MIRRORS", "WATCHED BY"),
        [(m["pid"], m["seq"], m["active"], m["mirrors"], _WATCHED.get(int(m["uffd"]), "?"))
         for m in now.mms],
    ))  # fmt: skip
    return "\n\n".join(out).splitlines()


def frame(
    now: Reading,
    prev: Reading | None,
    *,
    title: str,
    width: int = 80,
    height: int = 24,
    block: str = "#",
    extra: Sequence[str] = (),
    footer: str = "",
) -> list[str]:
    """The screen's lines for ``now`` (rates against ``prev``), at most ``height`` lines
    of at most ``width`` characters: the figures first, ``extra`` (the demo's agents)
    after the histogram, the tables last; ``footer`` on the bottom line."""
    s = now.status
    clock = time.strftime("%H:%M:%S", time.localtime(now.at))
    top = f"{title}  hmmd epoch {s.get('epoch', '?')}  up {_uptime(float(s['uptime_s']))}"
    lines = [f"{top}{clock:>{max(1, width - len(top))}}"]
    in_flight = "?" if now.mms is None else str(sum(int(m["active"]) for m in now.mms))
    lines.append(
        f"sessions {s.get('sessions', 0)}  mms {s.get('mms', 0)}  mirrors {s.get('mirrors', 0)}"
        f"  in flight {in_flight}  evictions {s.get('evictions', 0)}  stale {s.get('stale', 0)}"
    )
    p = prev.status if prev is not None else None
    inval, faults, dma = (
        rate(p, s, *keys) if p is not None else None
        for keys in (("invalidations",), ("faults",), ("dma_reads", "dma_writes", "dma_atomics"))
    )
    lines.append(
        f"per second  invalidations {_per_s(inval)}  faults {_per_s(faults)}  dma {_per_s(dma)}"
    )
    lines += ["", *_latency(now, prev, width, block)]
    if extra:
        lines += ["", *extra]
    lines += ["", *_tables(now)]
    room = height - (1 if footer else 0)
    if len(lines) > room:
        lines = [*lines[: room - 1], f"... {len(lines) - room + 1} more lines (a taller terminal)"]
    if footer:
        lines += [""] * (room - len(lines)) + [footer]
    return [line[:width] for line in lines]


_CAPS = ("smcup", "rmcup", "civis", "cnorm", "home", "el", "ed")


def _capabilities(stream: IO[str]) -> dict[str, str] | None:
    """The terminal's control strings for a full screen, from terminfo ($TERM); None where
    ``stream`` is no terminal or the terminal cannot go home and erase (``dumb``)."""
    import curses

    try:
        if not stream.isatty():
            return None
        curses.setupterm(None, stream.fileno())
        caps = {name: (curses.tigetstr(name) or b"").decode("latin-1") for name in _CAPS}
        cup = curses.tigetstr("cup")
        if not caps["home"] and cup:
            caps["home"] = curses.tparm(cup, 0, 0).decode("latin-1")
    except (curses.error, OSError, ValueError):
        return None
    return caps if caps["home"] and caps["el"] and caps["ed"] else None


class Screen:
    """Frames drawn in place on ``stream``'s alternate screen (a context manager)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.caps = _capabilities(stream)
        self.block = ackhistogram.block_for(getattr(stream, "encoding", None))

    @property
    def usable(self) -> bool:
        """Whether ``stream`` is a terminal that can show a full screen."""
        return self.caps is not None

    def size(self) -> tuple[int, int]:
        """The terminal's columns and lines (80 x 24 when it cannot say)."""
        try:
            size = os.get_terminal_size(self.stream.fileno())
            return size.columns or 80, size.lines or 24
        except (OSError, ValueError):
            return 80, 24

    def __enter__(self) -> Screen:
        assert self.caps is not None, "Screen used on a stream that is not a full terminal"
        self.stream.write(self.caps["smcup"] + self.caps["civis"])
        self.stream.flush()
        return self

    def draw(self, lines: Sequence[str]) -> None:
        """Replace what the screen shows with ``lines`` (fitted by the caller)."""
        assert self.caps is not None
        el = self.caps["el"]
        self.stream.write(self.caps["home"] + (el + "\n").join(lines) + el + self.caps["ed"])
        self.stream.flush()

    def __exit__(self, *exc: object) -> None:
        assert self.caps is not None
        self.stream.write(self.caps["cnorm"] + self.caps["rmcup"])
        self.stream.flush()


@contextlib.contextmanager
def _keys(on_key: Callable[[str], None]) -> Iterator[None]:
    """Keys typed on stdin, one at a time, to ``on_key`` (cbreak mode: no Enter needed,
    Ctrl-C still interrupts); nothing when stdin is no terminal."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if fd < 0 or not os.isatty(fd):
        yield
        return
    loop = asyncio.get_running_loop()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    loop.add_reader(fd, lambda: on_key(os.read(fd, 32).decode(errors="replace")))
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


async def top_screen(
    screen: Screen, read: Callable[[], Awaitable[Reading]], interval: float, title: str
) -> None:
    """``hmmctl top`` full screen until ``q`` (or Ctrl-C): a frame per interval, and at
    once on a key or a resize. AgentError (hmmd gone) ends it, the screen given back."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    done = False

    def key(typed: str) -> None:
        nonlocal done
        done = done or "q" in typed.lower()
        wake.set()

    footer = f"q quits  (a reading every {interval:g} s)"
    loop.add_signal_handler(signal.SIGWINCH, wake.set)
    try:
        with screen, _keys(key):
            prev: Reading | None = None
            next_read = loop.time()
            now: Reading | None = None
            while not done:
                if now is None or loop.time() >= next_read:
                    prev, now = now, await read()
                    next_read = loop.time() + interval
                width, height = screen.size()
                screen.draw(frame(now, prev, title=title, width=width, height=height,
                                  block=screen.block, footer=footer))  # fmt: skip
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_read - loop.time())):
                        await wake.wait()
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)
