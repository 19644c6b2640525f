"""A raw knock at a TCP door, as anyone at an address can make it (for attack tests).

``knock_line`` connects from ``source`` (any of 127.0.0.0/8 on loopback), sends one line
such as ``channel 4242`` and returns the door's one-line answer, with no key, no DEALER
and no library in between: what a stranger on the host or the network can send.
"""

from __future__ import annotations

import socket

from hmmirror.transport.door import read_reply


def knock_line(port: int, line: str, source: str = "127.0.0.1", timeout: float = 5.0) -> str:
    """Knock at the TCP door on 127.0.0.1:``port`` from ``source`` with ``line``; the
    door's answer without its newline ("" if it closed without one)."""
    door = ("127.0.0.1", port)
    with socket.create_connection(door, timeout=timeout, source_address=(source, 0)) as s:
        s.sendall(line.encode() + b"\n")
        return read_reply(s).strip()
