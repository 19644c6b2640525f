"""``transport.sockowner``: the owner of a real TCP socket of this host (NETLINK_SOCK_DIAG)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time

import zmq
from hmmirror.transport.sockowner import knocker_uid, listener_uids, peers_at


def test_a_connection_and_a_listener_of_this_process_are_ours():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert os.getuid() in listener_uids("127.0.0.1", port)
        assert listener_uids("127.0.0.2", port) == set()
        with socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.3", 0)):
            accepted, source = listener.accept()
            with accepted:
                assert knocker_uid(source, accepted.getsockname()) == os.getuid()
                assert knocker_uid(("192.0.2.1", source[1]), accepted.getsockname()) is None


def test_a_dual_stack_listener_and_a_mapped_source():
    with socket.socket(socket.AF_INET6) as listener:
        listener.bind(("::", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert os.getuid() in listener_uids("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port)):
            accepted, source = listener.accept()
            with accepted:
                assert source[0] == "::ffff:127.0.0.1"
                assert knocker_uid(source[:2], accepted.getsockname()[:2]) == os.getuid()


#: ``SO_LINGER`` on, 0 s: ``close`` resets the connection, and leaves no ``TIME_WAIT``.
_RESET = struct.pack("ii", 1, 0)


def test_peers_at_lists_each_connection_once_while_other_sockets_come_and_go():
    """The Dialer's check that only the server reached its port (``Dialer._shut_port``)
    failed one dial in five beside 64 ZeroMQ peers reconnecting to a door that turns them
    away: ``/proc/net/tcp`` was read a page at a time, and a read after other sockets came
    or went listed an entry again, or missed one (here, one answer in four was wrong)."""
    door = socket.socket()
    door.bind(("127.0.0.1", 0))
    door.listen(128)
    door.settimeout(0.05)
    stop = threading.Event()
    turned_away = 0

    def turn_away() -> None:
        nonlocal turned_away
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = door.accept()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                conn.close()
                turned_away += 1

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    churn, clients, accepted = [], [], []
    turner = threading.Thread(target=turn_away)
    turner.start()
    try:
        for _ in range(64):
            dealer = ctx.socket(zmq.DEALER)
            dealer.linger = 0
            dealer.setsockopt(zmq.RECONNECT_IVL, 10)
            dealer.connect(f"tcp://127.0.0.1:{door.getsockname()[1]}")
            churn.append(dealer)
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            port = listener.getsockname()[1]
            for _ in range(32):  # spread over the table: one of them is soon near a change
                clients.append(socket.create_connection(("127.0.0.1", port)))
                accepted.append(listener.accept()[0])
            expected = sorted(("127.0.0.1", c.getsockname()[1]) for c in clients)
            answers, wrong = 0, []
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                found = sorted(peers_at("127.0.0.1", port))
                answers += 1
                if found != expected:
                    wrong.append(f"{len(found)} listed, {len(set(found))} of them different")
        assert turned_away > 200, f"only {turned_away} connections came and went"
        assert wrong == [], f"{len(wrong)} wrong answers of {answers}, the first: {wrong[0]}"
    finally:
        stop.set()
        turner.join(10)
        for sock in churn:
            sock.close()
        ctx.term()
        for conn in clients + accepted:
            conn.close()
        door.close()
