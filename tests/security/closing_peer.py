"""Peers that queue multi-frame messages and close, against one server connection socket each.

Run by ``test_frame_splice``: for ``argv[1]`` trials, a client DEALER binds
under ``argv[2]`` (a directory), a socket made by ``hmmirror.transport.Server``
for its connections connects to it, the client queues 2- and 3-frame messages
and closes at once, and the server socket reads frame by frame until nothing
is left (every tenth trial only after 0.3 s, three of the server's heartbeat
intervals, with more queued than its inbound HWM). It prints one JSON line
(messages read whole, messages cut short) and exits 0; a libzmq that aborts
(``Assertion failed: !_more`` or ``!_io_error``) kills it with SIGABRT instead.
"""

from __future__ import annotations

import json
import sys
import time

import zmq
from hmmirror.transport import Server


def _read_all(sock: zmq.Socket[object], quiet_s: float = 0.02) -> tuple[int, int]:
    """Read until nothing came for ``quiet_s``; return (whole messages, cut short)."""
    whole = cut = 0
    last = time.monotonic()
    while time.monotonic() - last < quiet_s:
        try:
            frame = sock.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            time.sleep(0.001)
            continue
        last = time.monotonic()
        try:
            while frame.more:
                frame = sock.recv(zmq.NOBLOCK, copy=False)
            whole += 1
        except zmq.Again:
            cut += 1
    return whole, cut


def main() -> None:
    trials, where = int(sys.argv[1]), sys.argv[2]
    server = Server(f"ipc://{where}/unused.sock", lambda conn, frames: None, heartbeat_ms=100)
    ctx = zmq.Context()
    seen = {"whole": 0, "cut": 0}
    try:
        for trial in range(trials):
            endpoint = f"ipc://{where}/peer-{trial}.sock"
            peer = ctx.socket(zmq.DEALER)
            peer.bind(endpoint)
            line = server._socket()
            line.connect(endpoint)
            if not peer.poll(5000, zmq.POLLOUT):  # a bound DEALER can send once connected
                raise SystemExit(f"trial {trial}: the server socket never connected")
            frames = 2 + trial % 2
            for _ in range(200):
                try:
                    peer.send_multipart([b"x"] * frames, zmq.NOBLOCK)
                except zmq.Again:
                    break
            time.sleep(0.005)
            peer.close(linger=0)
            if trial % 10 == 9:
                # Unread past the inbound HWM, the peer gone, a heartbeat's time: libzmq's
                # ZMTP heartbeat timer aborted here (``!_io_error``) while heartbeats were on.
                time.sleep(0.3)
            whole, cut = _read_all(line)
            seen["whole"] += whole
            seen["cut"] += cut
            line.close(linger=0)
    finally:
        ctx.destroy(linger=0)
        server.close()
    print(json.dumps(seen), flush=True)


if __name__ == "__main__":
    main()
