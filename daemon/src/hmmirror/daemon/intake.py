"""Userfaultfds that targets hand hmmd, kept until something mirrors their process.

A cooperating target (``hmmirror.client.expose()``) creates a userfaultfd and
sends it through the uffd intake (SPEC.md §1.6: the words and bounds are
``hmmirror.proto.intake``'s, the path and the knock ``hmmirror.transport.intake``'s)
with the line ``uffd``, or ``uffd strict`` for the second one strict-write
mirrors need. The sender is known by SO_PEERCRED,
never by what it says, and may only offer its own descriptor for itself. Every
offer holds a descriptor of hmmd's, so the book is bounded: an offer lasts
``OFFER_TTL`` at most, is dropped as soon as its process is gone, and there are
at most ``per_uid`` offers per uid and ``total`` in all; beyond that the offer
is refused, never the daemon.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hmmirror.daemon.linux.procfs import start_time
from hmmirror.proto.intake import OFFER_TTL, OFFERS_PER_UID
from hmmirror.transport.intake import intake_path


@dataclass
class Offer:
    """A userfaultfd of process (pid, start_time), offered by ``uid``, kept until ``expires``."""

    pid: int
    start_time: int
    fd: int
    uid: int
    expires: float

    def close(self) -> None:
        """Close the descriptor."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


class OfferBook:
    """Offers by pid, bounded per uid and in all, expiring."""

    def __init__(
        self,
        total: int,
        per_uid: int = OFFERS_PER_UID,
        ttl: float = OFFER_TTL,
        on_leave: Callable[[int, int], None] | None = None,
    ) -> None:
        self.total = total
        #: Called with (pid, start time) as each kept offer leaves, taken or closed.
        self.on_leave = on_leave
        self.per_uid = per_uid
        self.ttl = ttl
        self._offers: dict[int, Offer] = {}
        self.refused = 0

    def __len__(self) -> int:
        return len(self._offers)

    def __iter__(self) -> Iterator[Offer]:
        return iter(list(self._offers.values()))

    def put(self, pid: int, st: int, fd: int, uid: int) -> str | None:
        """Keep ``fd`` (ours once accepted) for (pid, st); the reason if refused (fd not kept)."""
        old = self._offers.pop(pid, None)
        if old is not None:
            self._close(old)  # the process offers again, or the pid was reused
        mine = sum(1 for o in self._offers.values() if o.uid == uid)
        if mine >= self.per_uid or len(self._offers) >= self.total:
            self.expire(check_alive=True)  # make room from the dead before refusing
            mine = sum(1 for o in self._offers.values() if o.uid == uid)
        if mine >= self.per_uid or len(self._offers) >= self.total:
            self.refused += 1
            return (
                f"hmmd keeps {mine} offers of uid {uid} and {len(self._offers)} in all; "
                "offer again once something mirrors the process"
            )
        self._offers[pid] = Offer(pid, st, fd, uid, time.monotonic() + self.ttl)
        return None

    def take(self, pid: int, st: int) -> int | None:
        """The offered descriptor of (pid, st), now the caller's; None if there is none."""
        offer = self._offers.pop(pid, None)
        if offer is None:
            return None
        if offer.start_time != st:
            self._close(offer)  # offered by an earlier process with the same pid
            return None
        if self.on_leave is not None:
            self.on_leave(offer.pid, offer.start_time)
        return offer.fd

    def expire(self, *, check_alive: bool = True) -> int:
        """Close offers past their time (and, with ``check_alive``, those whose process is
        gone); return how many."""
        now = time.monotonic()
        gone = []
        for pid, offer in self._offers.items():
            if offer.expires <= now:
                gone.append(pid)
                continue
            if not check_alive:
                continue
            try:
                alive = start_time(pid) == offer.start_time
            except ProcessLookupError:
                alive = False
            if not alive:
                gone.append(pid)
        for pid in gone:
            self._close(self._offers.pop(pid))
        return len(gone)

    def close(self) -> None:
        """Close every offer."""
        for offer in list(self._offers.values()):
            self._close(offer)
        self._offers.clear()

    def _close(self, offer: Offer) -> None:
        """Close a kept offer that leaves the book untaken."""
        offer.close()
        if self.on_leave is not None:
            self.on_leave(offer.pid, offer.start_time)


def default_path(endpoint: str) -> str:
    """Where targets send their userfaultfd unless ``expose_socket`` says otherwise: the
    intake's own rule (``hmmirror.transport.intake.intake_path``)."""
    return intake_path(endpoint)
