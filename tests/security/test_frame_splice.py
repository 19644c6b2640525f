"""Raw peers against the transport's fair queue: no frame of one peer's message may be
read as part of another's, and the server must not abort.

libzmq's fair queue loses its place when one pipe finishes terminating while a
message of another pipe is half read (``hmmirror.transport.server`` explains
it); with one ROUTER for all peers, a peer that floods multi-frame messages
while others connect, send and close made hmmd abort (``Assertion failed:
!_more (src/fq.cpp:80)``) or splice frames of different peers into one
message. Here peers do exactly that, against a real server process
(``splice_server.py``) that checks every message it gets, and then against a
real hmmd, which must still answer. A peer that closes with multi-frame
messages still queued made each connection's own socket abort too, while
libzmq's reconnection was off (``closing_peer.py``).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from typing import Any

import zmq
from hmmirror.client import DaemonUnavailable
from hmmirror.client.session import status
from hmmirror.transport import dial
from hmmirror.transport.door import DoorError

SERVER = os.path.join(os.path.dirname(__file__), "splice_server.py")
CLOSING_PEER = os.path.join(os.path.dirname(__file__), "closing_peer.py")
#: How long the peers churn and flood (the old transport failed within about a second).
ATTACK_SECONDS = 6.0


def _message(tag: bytes, seq: int, frames: int) -> list[bytes]:
    return [b"%s:%d:%d" % (tag, seq, frames)] * frames


def _burst(sock: zmq.Socket[Any], tag: bytes, seq: int, count: int, sent: dict[str, Any]) -> int:
    """Send up to ``count`` 2- to 4-frame messages without blocking; return the last seq."""
    try:
        for _ in range(count):
            seq += 1
            sock.send_multipart(_message(tag, seq, 2 + seq % 3), zmq.NOBLOCK)
            sent["messages"] += 1
    except zmq.Again:
        pass
    return seq


def attack(endpoint: str, seconds: float) -> dict[str, Any]:
    """Three peers flood 2- to 4-frame messages; meanwhile others connect, send a burst
    of them and close, again and again. Returns what was sent (and why it stopped early,
    if the server's door stopped answering)."""
    ctx = zmq.Context()
    sent: dict[str, Any] = {"messages": 0, "churned": 0}
    try:
        flooders = [(dial(ctx, endpoint), secrets.token_hex(4).encode()) for _ in range(3)]
        seq = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            churner = dial(ctx, endpoint)
            tag = secrets.token_hex(4).encode()
            try:
                seq = _burst(churner, tag, seq, 40, sent)
            finally:
                churner.close(linger=0)
            sent["churned"] += 1
            for sock, tag in flooders:
                seq = _burst(sock, tag, seq, 60, sent)
    except (DoorError, OSError) as exc:
        sent["stopped"] = str(exc)
    finally:
        ctx.destroy(linger=0)
    return sent


def test_no_frame_is_spliced_across_peers(tmp_path: Any) -> None:
    """A transport server under churn and multi-frame floods gets every message whole."""
    endpoint = f"ipc://{tmp_path}/splice.sock"
    server = subprocess.Popen(
        [sys.executable, SERVER, endpoint],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stdout is not None and server.stdin is not None
        assert server.stdout.readline().strip() == b"ready"
        sent = attack(endpoint, ATTACK_SECONDS)
        time.sleep(0.5)
        out, err = server.communicate(timeout=30)  # closes its stdin: it reports and exits
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, f"the server died ({server.returncode}): {err.decode()[-500:]}"
    got = json.loads(out.decode().splitlines()[-1])
    print(f"sent {sent}, server got {got}")
    assert got["messages"] > 10_000, f"too little traffic to prove anything: {got}"
    assert got["spliced"] == 0, f"messages with frames of other messages: {got['examples']}"


def test_a_peer_that_closes_with_messages_queued_never_aborts_the_server(tmp_path: Any) -> None:
    """A peer queues multi-frame messages and closes: the server's connection socket reads
    what arrived, whole, and libzmq does not abort.

    With reconnection off (-1) libzmq ended the connection between two frames of a queued
    message and aborted on the next ``recv``, within a few of these trials."""
    run = subprocess.run(
        [sys.executable, CLOSING_PEER, "100", str(tmp_path)],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, f"the server socket died ({run.returncode}): {run.stderr[-300:]!r}"
    seen = json.loads(run.stdout.decode().splitlines()[-1])
    assert seen["whole"] > 100, f"too little traffic to prove anything: {seen}"
    assert seen["cut"] == 0, f"messages cut short: {seen}"


async def test_hmmd_survives_churn_with_multiframe_floods(hmmd: Any) -> None:
    """The same attack against hmmd itself: it stays up and answers afterwards."""
    sent = attack(hmmd.endpoint, ATTACK_SECONDS)
    try:
        answer = await status(hmmd.endpoint, 5.0)
    except DaemonUnavailable as exc:
        raise AssertionError(f"hmmd is gone after {sent}: {hmmd.stderr()[-600:]}") from exc
    assert answer["epoch"], answer
    assert hmmd.proc.poll() is None
