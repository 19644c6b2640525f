"""systemd's notify protocol, client side: one datagram to ``$NOTIFY_SOCKET`` (sd_notify(3)).

``hm-agent`` sends ``READY=1`` once it serves and ``STOPPING=1`` on the way out.
Without ``$NOTIFY_SOCKET`` (not under systemd) it is a no-op. hmmd has its own,
with the watchdog (``hmmirror.daemon.sdnotify``); a client cannot import it.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (``KEY=value`` lines) to the service manager; False if there is none."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address  # abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", address, exc)
        return False
    return True
