"""hmmd's budgets: raise RLIMIT_NOFILE, then cap the descriptors and mirrors peers make it hold.

Every connection holds three descriptors (the connection, its own ZeroMQ
socket's mailbox and the client's socket file, see
``hmmirror.transport.server``), every watched process up to six (a pidfd,
maps, pagemap, two userfaultfds, its claim among the host's hmmds: ``owners``),
every userfaultfd offer two (the descriptor and its claim). Peers
decide how many of each exist, so each is capped with headroom below the limit:
beyond a cap hmmd refuses the request politely; it never runs out of
descriptors itself (where libzmq would abort rather than fail).

Mirrors are capped the same way (``MirrorCaps``): each holds two shadow arrays
of 8 bytes per page of its range (``state.Span``), two mappings of hmmd's own
once large, so a peer registering mirror after mirror of its own process would
otherwise use up hmmd's mappings (``vm.max_map_count``) and memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from hmmirror.daemon.config import Config
from hmmirror.transport import Limits
from hmmirror.transport.server import FD_RESERVE, FDS_PER_CONNECTION, raise_nofile

#: Descriptors kept for hmmd itself: libzmq's threads and mailboxes, logs, /proc reads.
RESERVE = FD_RESERVE
#: Descriptors one connection, one watched process and one offer hold at most.
PER_CONNECTION, PER_MM, PER_OFFER = FDS_PER_CONNECTION, 6, 2


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


#: Where the kernel says how many mappings a process may have.
MAX_MAP_COUNT = "/proc/sys/vm/max_map_count"


@dataclass(frozen=True)
class MirrorCaps:
    """The most mirrors in all, and mirrors and mirrored pages per peer (not root)."""

    total: int
    per_peer: int
    pages_per_peer: int

    @classmethod
    def of(cls, config: Config) -> MirrorCaps:
        """The caps ``config`` sets; ``max_mirrors = 0``: a quarter of the mappings the
        kernel allows a process (two per large mirror, half of them kept for the rest)."""
        total = config.max_mirrors
        if total == 0:
            maps = 65530  # the kernel's default, where the file cannot be read
            with contextlib.suppress(OSError, ValueError), open(MAX_MAP_COUNT) as f:
                maps = int(f.read())
            total = max(1024, maps // 4)
        return cls(total, config.max_mirrors_per_peer, config.max_mirror_pages_per_peer)
