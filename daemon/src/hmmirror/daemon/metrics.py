"""A Prometheus text endpoint (off by default) with the figures ``hmmctl status`` shows.

``metrics = "127.0.0.1:9464"`` in the config serves ``GET /metrics`` in the
text exposition format (version 0.0.4); every numeric status figure becomes
``hmmirror_<name>``, typed counter or gauge. Requests are read with a deadline
and a size cap, like everything else hmmd takes from the network.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

#: Status figures that only ever grow.
COUNTERS = frozenset(
    {
        "messages", "bad_messages", "faults", "dma_reads", "dma_writes", "dma_atomics",
        "evictions", "releases", "registrations", "invalidations", "stale", "uffd_events",
        "written_runs", "strict_write_faults", "uffd_refusals",
    }
)  # fmt: skip
REQUEST_DEADLINE = 2.0
MAX_REQUEST = 8192

Figures = Callable[[], dict[str, int | float | str]]


def render(figures: dict[str, int | float | str]) -> str:
    """The exposition text for ``figures`` (strings are left out, booleans never occur)."""
    lines = []
    for name, value in sorted(figures.items()):
        if isinstance(value, str):
            continue
        metric = f"hmmirror_{name}"
        kind = "counter" if name in COUNTERS else "gauge"
        lines.append(f"# TYPE {metric} {kind}")
        lines.append(f"{metric} {value}")
    return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves ``render(figures())`` on ``address`` (``HOST:PORT``; port 0 picks one)."""

    def __init__(self, figures: Figures) -> None:
        self.figures = figures
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self, address: str) -> None:
        """Bind and serve; ``url`` then says where."""
        host, _, port = address.rpartition(":")
        self.server = await asyncio.start_server(self._serve, host or "127.0.0.1", int(port))
        bound = self.server.sockets[0].getsockname()
        self.url = f"http://{bound[0]}:{bound[1]}/metrics"

    def close(self) -> None:
        """Stop serving."""
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request: GET /metrics gets the figures, anything else a 404 or 400."""
        try:
            async with asyncio.timeout(REQUEST_DEADLINE):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        if len(head) > MAX_REQUEST:
            status, body = "400 Bad Request", "request too large\n"
        elif head.startswith((b"GET /metrics ", b"GET /metrics?")):
            status, body = "200 OK", render(self.figures())
        else:
            status, body = "404 Not Found", "only GET /metrics is served here\n"
        data = body.encode()
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
