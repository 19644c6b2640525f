"""The VmFlags of a process's VMAs, from /proc/PID/smaps: for rare checks (a page walk per
VMA). Its own module, free of numpy, because the injector's helper process imports it and
hmmd waits for that helper to start."""

from __future__ import annotations

from collections.abc import Iterator


def smaps_flags(pid: int) -> Iterator[tuple[int, int, frozenset[bytes]]]:
    """Each VMA of ``pid`` as (start, end, its ``VmFlags`` words), from /proc/PID/smaps
    (proc(5); a page walk per VMA, so for rare checks only). OSError if unreadable."""
    lo = hi = 0
    with open(f"/proc/{pid}/smaps", "rb") as f:
        for line in f:
            head = line.split(b" ", 1)[0]
            if b"-" in head and not head.endswith(b":"):
                lo, hi = (int(x, 16) for x in head.split(b"-"))
            elif head == b"VmFlags:":
                yield lo, hi, frozenset(line.split()[1:])
