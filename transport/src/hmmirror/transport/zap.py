"""The ZAP handler of a CURVE server: which client keys may complete a handshake.

libzmq asks the ZAP handler (RFC 27, ``inproc://zeromq.zap.01`` of the socket's
context) about every CURVE handshake in which the socket is the CURVE server,
whichever side connected. This one admits a key only if its certificate is in
the allow-list directory (reread when the directory changes), and names the
admitted key in the reply's user id, which libzmq then attaches to every
message as ``User-Id``. Requests for another domain, or another mechanism, are
refused. The handler never raises: a malformed request gets a refusal.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import zmq
import zmq.utils.z85
from hmmirror.transport.keys import AllowDir

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
#: The domain hmmirror's CURVE sockets announce (a ZAP request for another is refused).
DOMAIN = b"hmmirror"


class ZapHandler:
    """A thread answering ZAP requests for one context against an allow-list."""

    def __init__(self, ctx: zmq.Context[Any], allow: AllowDir) -> None:
        self.allow = allow
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hmmirror-zap", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread (it polls, so this returns within its poll interval)."""
        self._stop.set()
        self._thread.join(2.0)
        self._sock.close(linger=0)

    def _run(self) -> None:
        """Answer requests until closed."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(200):
                continue
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            try:
                reply = self._answer(frames)
            except Exception:  # never leave libzmq without a reply
                log.exception("ZAP request failed")
                reply = [b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"error", b"", b""]
            try:
                self._sock.send_multipart(reply)
            except zmq.ZMQError:
                continue

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        """The reply frames for one request."""
        if len(frames) < 6:
            return [b"1.0", frames[1] if len(frames) > 1 else b"", b"400", b"malformed", b"", b""]
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        credentials = frames[6:]

        def refuse(why: str) -> list[bytes]:
            self.refused += 1
            if self.refused <= 100 or self.refused % 1000 == 0:
                log.warning("refused a handshake with %s: %s",
                            address.decode(errors="replace"), why)  # fmt: skip
            return [version, request_id, b"400", why.encode()[:128], b"", b""]

        if domain != DOMAIN:
            return refuse(f"unknown ZAP domain {domain!r}")
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return refuse(f"mechanism {mechanism.decode(errors='replace')} is not accepted")
        key = zmq.utils.z85.encode(credentials[0])
        if not self.allow.allows(key):
            return refuse(f"CURVE key {key.decode()} is not in {self.allow.directory}")
        return [version, request_id, b"200", b"OK", key, b""]
