"""A one-line progress bar for ``hmmctl check`` and the demo: done of the total, time left.

It is drawn on a terminal only (``stderr``, by the callers), redrawn in place with a
carriage return, and never written where output is read by a program: when the
stream is not a terminal, or under ``-j``, ``Progress`` is off and writes nothing.
Lines the run prints meanwhile go through ``aside()``, which erases the bar, lets
the line out and draws the bar again under it, so that both share one terminal.
``line()`` is the bar's text alone, for a full-screen view that draws it itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO

#: Erase the line the cursor is on, from its start (ANSI: every terminal we draw on).
_ERASE = "\r\x1b[K"


def left_text(seconds: float | None) -> str:
    """Time left as people say it: ``"~12 s left"``, ``"~2:05 left"``; "" if unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    whole = round(seconds)
    if whole < 100:
        return f"~{whole} s left"
    return f"~{whole // 60}:{whole % 60:02d} left"


def estimate_left(elapsed: float, fraction: float) -> float | None:
    """Seconds left if the rest goes as fast as what is done (None before anything is)."""
    if fraction <= 0 or elapsed <= 0:
        return None
    return elapsed * (1 - min(fraction, 1.0)) / fraction


def line(label: str, fraction: float, detail: str, left_s: float | None, width: int) -> str:
    """``check  [#####.....]  42%  round 6, 480/5000 ops  ~12 s left``, at most ``width``
    characters (the bar takes what the words leave, 10 to 40 cells)."""
    fraction = min(max(fraction, 0.0), 1.0)
    words = f"{fraction:4.0%}  {detail}"
    left = left_text(left_s)
    if left:
        words += f"  {left}"
    cells = max(10, min(40, width - len(label) - len(words) - 6))
    done = round(fraction * cells)
    text = f"{label}  [{'#' * done}{'.' * (cells - done)}]  {words}"
    return text[: max(width, 1)]


class Progress:
    """The bar on ``stream``, when it is a terminal (``enabled``); a no-op otherwise."""

    def __init__(self, stream: IO[str] | None, label: str, enabled: bool = True) -> None:
        self.stream = stream
        self.label = label
        #: Whether the caller wants progress shown (not under ``-j`` or ``-q``): a full
        #: screen may then draw ``line()`` itself, wherever this bar's stream goes.
        self.wanted = enabled
        self.enabled = enabled and stream is not None and _isatty(stream)
        self._text = ""
        self._shown = False

    def update(self, fraction: float, detail: str, left_s: float | None = None) -> None:
        """Draw the bar at ``fraction`` (0 to 1), with ``detail`` and the time left."""
        if not self.enabled or self.stream is None:
            return
        self._text = line(self.label, fraction, detail, left_s, self._width() - 1)
        self.stream.write(_ERASE + self._text)
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the bar (it comes back at the next ``update`` or ``redraw``)."""
        if self._shown and self.stream is not None:
            self.stream.write(_ERASE)
            self.stream.flush()
            self._shown = False

    def redraw(self) -> None:
        """Draw the last bar again (after ``clear``)."""
        if self.enabled and self._text and not self._shown and self.stream is not None:
            self.stream.write(_ERASE + self._text)
            self.stream.flush()
            self._shown = True

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        """Erase the bar while the caller writes a line; draw it again after."""
        self.clear()
        try:
            yield
        finally:
            self.redraw()

    def close(self) -> None:
        """Erase the bar for good."""
        self.clear()
        self._text = ""

    def _width(self) -> int:
        """The terminal's width (80 when it cannot be read)."""
        assert self.stream is not None
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (OSError, ValueError):
            return 80


def _isatty(stream: IO[str]) -> bool:
    """Whether ``stream`` is a terminal (a closed or fd-less stream is not)."""
    try:
        return stream.isatty()
    except (ValueError, OSError):
        return False
