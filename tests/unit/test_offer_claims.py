"""``OfferBook.on_leave``: every offer that leaves the book, taken or closed, gives its claim
back once (``watch.acquire`` drops the offer's claim among the host's hmmds there).

The offers hold real descriptors (of /dev/null); processes are this test's own and a child
that has exited, so ``expire(check_alive=True)`` sees a real dead process.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter

from hmmirror.daemon.intake import OfferBook
from hmmirror.daemon.linux.procfs import start_time

ME = os.getpid()


def null() -> int:
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def book(
    total: int = 8, per_uid: int = 4, ttl: float = 30.0
) -> tuple[OfferBook, Counter[tuple[int, int]]]:
    left: Counter[tuple[int, int]] = Counter()
    return OfferBook(total, per_uid, ttl, on_leave=lambda pid, st: left.update([(pid, st)])), left


def test_taken_gives_back_once_and_a_mismatch_too() -> None:
    offers, left = book()
    st = start_time(ME)
    assert offers.put(ME, st, null(), 0) is None
    fd = offers.take(ME, st)
    assert fd is not None and left == Counter({(ME, st): 1})
    os.close(fd)
    assert offers.put(ME, st, null(), 0) is None
    assert offers.take(ME, st + 1) is None  # an earlier process of that pid offered it
    assert left == Counter({(ME, st): 2}) and len(offers) == 0
    assert offers.take(ME, st) is None and left[(ME, st)] == 2  # nothing left to give back


def test_replaced_refused_expired_and_closed_each_give_back_once() -> None:
    offers, left = book(total=2, per_uid=1, ttl=30.0)
    st = start_time(ME)
    assert offers.put(ME, st, null(), 0) is None
    assert offers.put(ME, st, null(), 0) is None  # the same process offers again
    assert left == Counter({(ME, st): 1})
    fd = null()
    refused = offers.put(ME + 1, 5, fd, 0)  # uid 0's one offer is kept: refused
    os.close(fd)  # a refused descriptor stays the caller's
    assert refused is not None and left[(ME + 1, 5)] == 0
    child = subprocess.Popen(["true"])
    child.wait()
    assert offers.put(child.pid, 7, null(), 1) is None
    assert offers.expire(check_alive=True) == 1  # the child is gone
    assert left[(child.pid, 7)] == 1
    offers.close()
    assert left == Counter({(ME, st): 2, (child.pid, 7): 1})
