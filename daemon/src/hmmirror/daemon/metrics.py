"""A Prometheus endpoint (off by default): ``GET /metrics`` on hmmd's own event loop.

``metrics = "127.0.0.1:9464"`` in the config serves what ``exposition``
collects, in the Prometheus text format (0.0.4) or, when the scraper's
``Accept`` asks for it, OpenMetrics; prometheus_client chooses and writes
the format. The HTTP side is hmmd's own and small, because a scraper is a
peer like any other: each request is read and answered within a deadline,
its head is capped in size, and only so many are served at once, so a slow
or hostile client holds neither the loop nor more than a few sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # prometheus_client is imported by ``start``: most hmmds serve no metrics
    from hmmirror.daemon.exposition import Figures
    from prometheus_client.registry import CollectorRegistry

#: Seconds a client has to send its request and take the answer.
REQUEST_DEADLINE = 2.0
#: Bytes a request head may take (request line and headers).
MAX_REQUEST = 8192
#: Requests served at once; more are closed unanswered.
MAX_CONNECTIONS = 16


def accept_of(head: bytes) -> str:
    """The ``Accept`` header of a request head ("" when absent, or when it holds anything but
    printable ASCII: prometheus_client copies its version into the answer's Content-Type)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"accept":
            value = value.strip()
            return value.decode("ascii") if all(0x20 <= c < 0x7F for c in value) else ""
    return ""


class MetricsServer:
    """Serves ``GET /metrics`` on ``address`` (``HOST:PORT``; port 0 picks one).

    ``figures`` is ``Daemon.status``; ``latency`` the invalidator's ``LatencyLog``,
    whose round trips become ``hmmirror_ack_round_trip_seconds``.
    """

    def __init__(self, figures: Figures, latency: object | None = None) -> None:
        self.figures = figures
        self.latency = latency
        self.registry: CollectorRegistry | None = None
        self.server: asyncio.Server | None = None
        self.url = ""
        self.open = 0

    async def start(self, address: str) -> None:
        """Bind and serve; ``url`` then says where."""
        from hmmirror.daemon.exposition import registry

        host, _, port = address.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")  # "[::1]:9464", as URLs write it
        self.registry = registry(self.figures, self.latency)
        self.server = await asyncio.start_server(
            self._serve, host or "127.0.0.1", int(port), limit=MAX_REQUEST
        )
        bound = self.server.sockets[0].getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}/metrics"

    def close(self) -> None:
        """Stop serving."""
        if self.server is not None:
            self.server.close()

    def answer(self, head: bytes) -> tuple[str, str, bytes]:
        """Status line, content type and body for a request ``head``."""
        if not head.startswith((b"GET /metrics ", b"GET /metrics?")):
            return "404 Not Found", "text/plain", b"only GET /metrics is served here\n"
        assert self.registry is not None  # start() made it before serving
        from prometheus_client.exposition import choose_encoder  # loaded by start() already

        try:
            encoder, content_type = choose_encoder(accept_of(head))
        except (TypeError, ValueError):  # a version it cannot compare ("version=x"): the plain
            encoder, content_type = choose_encoder("")  # format, as for no Accept at all
        return "200 OK", content_type, encoder(self.registry)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request, within the deadline; the connection is closed afterwards."""
        self.open += 1
        try:
            if self.open <= MAX_CONNECTIONS:
                async with asyncio.timeout(REQUEST_DEADLINE):
                    await self._exchange(reader, writer)
        except TimeoutError:  # a client that does not take the answer keeps nothing of hmmd's
            writer.transport.abort()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read the head (at most ``MAX_REQUEST`` bytes), write the answer."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:  # no end of head within MAX_REQUEST bytes
            status, content_type, body = "400 Bad Request", "text/plain", b"request too large\n"
        else:
            status, content_type, body = self.answer(head)
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
