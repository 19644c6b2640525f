"""hmmd's descriptor budget: raise RLIMIT_NOFILE, then cap what peers can make it hold.

Every connection holds three descriptors (the connection, its own ZeroMQ
socket's mailbox and the client's socket file, see
``hmmirror.transport.server``), every watched process up to five (a pidfd,
maps, pagemap, two userfaultfds), every userfaultfd offer one. Peers
decide how many of each exist, so each is capped with headroom below the limit:
beyond a cap hmmd refuses the request politely; it never runs out of
descriptors itself (where libzmq would abort rather than fail).
"""

from __future__ import annotations

from dataclasses import dataclass

from hmmirror.daemon.config import Config
from hmmirror.transport import Limits
from hmmirror.transport.server import FD_RESERVE, FDS_PER_CONNECTION, raise_nofile

#: Descriptors kept for hmmd itself: libzmq's threads and mailboxes, logs, /proc reads.
RESERVE = FD_RESERVE
#: Descriptors one connection, one watched process and one offer hold at most.
PER_CONNECTION, PER_MM, PER_OFFER = FDS_PER_CONNECTION, 5, 1


@dataclass(frozen=True)
class FdBudget:
    """How the descriptors under ``nofile`` are shared out."""

    nofile: int
    connection_limits: Limits
    mms: int
    offers: int

    @classmethod
    def raise_limit(cls, config: Config) -> FdBudget:
        """Raise the soft RLIMIT_NOFILE to the hard limit, then divide it up."""
        return cls.of(raise_nofile(), config)

    @classmethod
    def of(cls, nofile: int, config: Config) -> FdBudget:
        """The shares of ``nofile`` descriptors: a quarter for connections, half for watched
        processes, a sixteenth for offers; the rest is headroom."""
        usable = max(0, nofile - RESERVE)
        total = config.max_connections or max(8, usable // 4 // PER_CONNECTION)
        limits = Limits(per_peer=config.max_connections_per_peer, total=total)
        mms = max(8, usable // 2 // PER_MM)
        offers = max(8, min(1024, usable // 16 // PER_OFFER))
        return cls(nofile, limits, mms, offers)
