"""``transport.sockowner``: the owner of a real TCP socket of this host (NETLINK_SOCK_DIAG)."""

from __future__ import annotations

import os
import socket

from hmmirror.transport.sockowner import knocker_uid, listener_uids


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
