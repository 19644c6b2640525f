"""The wire protocol version, independent of any package version.

A peer whose major version differs is refused with ``VERSION_MISMATCH``; a
newer minor version is accepted and its unknown fields are ignored.
"""

from __future__ import annotations

PROTOCOL_VERSION: tuple[int, int] = (1, 3)
#: The first version with the shared-memory DMA window (SPEC §4.9): a session whose
#: ``hello`` said less never gets one, and a ``welcome`` from an older daemon offers none.
WINDOW_VERSION: tuple[int, int] = (1, 1)
#: The first version that takes an INVALIDATE over several mirrors (``Invalidate.mirrors``,
#: SPEC §4.3): a session whose ``hello`` said less gets one INVALIDATE per mirror.
MIRRORS_VERSION: tuple[int, int] = (1, 2)
#: The first version told ``MOVED`` (SPEC §1.7): a process watched by another hmmd of the
#: host is refused with the owner's endpoint; a session whose ``hello`` said less gets
#: ``PERMISSION_DENIED`` with the endpoint in the message.
MOVED_VERSION: tuple[int, int] = (1, 3)
#: Seconds a fault or device access keeps retrying invalidations that race it before it
#: gives up with ``EBUSY`` (SPEC §3, the EBUSY row; the kernel's HMM_RANGE_DEFAULT_TIMEOUT).
RETRY_BUDGET = 1.0


def compatible(version: tuple[int, int]) -> bool:
    """Return True when a peer speaking ``version`` can talk to us."""
    return version[0] == PROTOCOL_VERSION[0]
