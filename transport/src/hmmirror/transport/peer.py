"""Who is on the other end of a connection, as the transport proved it.

An ``ipc://`` peer is known by the kernel's SO_PEERCRED (uid, gid, pid); a
``tcp://`` peer by the CURVE public key the ZAP handler admitted, or by nothing
at all on an ``insecure`` endpoint (and, for limits only, by the local user that
made the knock, when it came from this host). Nothing a peer *says* ever goes in here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    """A connection's proven identity."""

    uid: int | None = None
    """The peer process's uid (``ipc://`` only)."""
    gid: int | None = None
    """The peer process's gid (``ipc://`` only)."""
    pid: int | None = None
    """The pid that opened the connection (``ipc://`` only)."""
    curve_key: str | None = None
    """The Z85 CURVE public key (``tcp://`` with CURVE only)."""
    address: str | None = None
    """The remote address (``tcp://`` only; for logs and connection limits)."""
    host_uid: int | None = None
    """The uid owning the knock's socket when it was made on this host (``tcp://`` only;
    ``sockowner``): what the door counts a local user's connections by, and whose ports it
    may name. Never an authorization: over ``tcp://`` that is the CURVE key's."""

    @property
    def local(self) -> bool:
        """Whether the kernel vouched for the peer's credentials (``ipc://``)."""
        return self.uid is not None

    @property
    def root(self) -> bool:
        """A local peer running as uid 0."""
        return self.uid == 0

    @property
    def identity(self) -> str:
        """``uid:N``, ``curve:KEY`` or ``unknown``: how policies and logs name the peer."""
        if self.uid is not None:
            return f"uid:{self.uid}"
        if self.curve_key:
            return f"curve:{self.curve_key}"
        return "unknown"


#: Control characters (C0, DEL, C1) and the line and paragraph separators, as ``\xNN`` or
#: ``\uNNNN`` escapes.
_UNPRINTABLE = {
    c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}


def printable(text: str) -> str:
    """``text`` (a name a peer chose, say) with its control characters escaped: one line,
    which cannot forge a log line of its own or move a terminal's cursor."""
    return text.translate(_UNPRINTABLE)
