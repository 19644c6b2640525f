"""systemd's notify protocol: one datagram per state change to ``$NOTIFY_SOCKET``.

``READY=1`` once the socket is bound, ``WATCHDOG=1`` every half of
``$WATCHDOG_USEC``, ``STOPPING=1`` on the way out, and ``STATUS=`` lines for
``systemctl status``. Without ``$NOTIFY_SOCKET`` (not under systemd) every call
is a no-op. This is the real protocol (sd_notify(3)), not libsystemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (``KEY=value`` lines) to the service manager; False if there is none."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd set for this process, in seconds, or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.001)
    except ValueError:
        return None


async def keep_watchdog_fed(interval: float) -> None:
    """Send ``WATCHDOG=1`` every ``interval`` seconds until cancelled.

    It runs on the event loop, so a loop that stops turning stops the pings and
    systemd restarts the daemon: a hang is caught, not only a crash.
    """
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)
