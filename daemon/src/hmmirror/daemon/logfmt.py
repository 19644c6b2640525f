"""Log lines on stderr for hmmd and hm-agent: text, journald's own format, or JSON.

- ``text``: ``2026-12-05T08:47:43.123Z warning hmmirror.daemon.app: message [session=3]``,
  UTC timestamps, the structured fields in brackets at the end.
- Under systemd, when stderr is the journal (``$JOURNAL_STREAM`` names stderr's device
  and inode, systemd.exec(5)), text lines drop the timestamp (journald stamps each
  line itself) and start with the ``<N>`` priority prefix of sd-daemon(3), so that
  ``journalctl -p warning`` selects them.
- ``json``: one object per line, ``{"ts", "level", "logger", "msg"}`` plus the
  structured fields (``session``, ``agent``, ``pid``, ``mirror``, ``peer``) and
  ``exc`` with a traceback, which log shippers parse without regular expressions.

Fields come from ``extra=fields(session=..., pid=...)`` at the call site. Payloads
never appear in logs; only what failed, for whom and why.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

from hmmirror.transport.peer import printable

#: The structured fields a record may carry, in the order text lines show them.
FIELDS = ("session", "agent", "pid", "mirror", "peer")
#: sd-daemon(3) priorities (syslog's) by logging level.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def fields(**values: object) -> dict[str, object]:
    """``extra=`` for a log call: the given structured fields (see :data:`FIELDS`)."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields: {sorted(unknown)}")
    return values


class Limited:
    """Logs at most ``burst`` lines per ``window`` seconds through ``logger``, then says how
    many ``what`` it skipped: for lines a peer can cause at will (a refusal, a reply it
    never read), so that the peer cannot fill the journal or spend hmmd's loop on logging."""

    def __init__(
        self, logger: logging.Logger, what: str, burst: int = 20, window: float = 10.0
    ) -> None:
        self.logger, self.what = logger, what
        self.burst, self.window = burst, window
        self._start = -window
        self._logged = 0
        self._skipped = 0

    def log(
        self, level: int, text: str, *args: object, extra: dict[str, object] | None = None
    ) -> None:
        """Log ``text % args`` (with ``extra``: ``fields``) at ``level`` unless this window's
        budget is spent."""
        now = time.monotonic()
        if now - self._start >= self.window:
            if self._skipped:
                self.logger.log(level, "%d more %s were not logged", self._skipped, self.what)
            self._start, self._logged, self._skipped = now, 0, 0
        if self._logged < self.burst:
            self._logged += 1
            self.logger.log(level, text, *args, extra=extra)
        else:
            self._skipped += 1

    def warning(self, text: str, *args: object, extra: dict[str, object] | None = None) -> None:
        """``log`` at WARNING."""
        self.log(logging.WARNING, text, *args, extra=extra)

    def info(self, text: str, *args: object, extra: dict[str, object] | None = None) -> None:
        """``log`` at INFO."""
        self.log(logging.INFO, text, *args, extra=extra)


def _present(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields ``record`` carries."""
    return {k: getattr(record, k) for k in FIELDS if getattr(record, k, None) is not None}


def _priority(levelno: int) -> int:
    """The syslog priority of a logging level (a custom level takes the next one down)."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class TextFormatter(logging.Formatter):
    """``TIMESTAMP level logger: message [field=value ...]``; under journald, ``<N>`` first
    and no timestamp, on every line of a multi-line record."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line (more when it carries a traceback)."""
        # What a peer said (an agent's name, say) may hold a newline: one record stays one
        # line, or a peer could forge a line of hmmd's own (a traceback's lines follow).
        text = f"{record.levelname.lower()} {record.name}: {printable(record.getMessage())}"
        extra = _present(record)
        if extra:
            text += " [" + " ".join(f"{k}={printable(str(v))}" for k, v in extra.items()) + "]"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journal:
            prefix = f"<{_priority(record.levelno)}>"
            return "\n".join(prefix + line for line in text.splitlines())
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z {text}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_present(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def journal_is(stream: TextIO) -> bool:
    """Whether ``stream`` is connected to the journal (systemd sets ``$JOURNAL_STREAM`` to
    ``DEVICE:INODE`` of the stream it connected; a redirected stream no longer matches)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def configure(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send logs to ``stream`` (stderr) at ``level``, as ``fmt`` ("text" or "json")."""
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(journal=journal_is(out)))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
