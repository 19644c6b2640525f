"""The processes a test started, followed through ``/proc``: who descends from a pid, and
which of them still run (the same process, told apart from a reused pid by its start time).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["Ident", "descendants", "identity", "still_running"]

#: A process as ``/proc`` names it: (pid, start time in clock ticks since boot, as text).
Ident = tuple[int, str]


def identity(pid: int) -> Ident | None:
    """``pid`` and its start time (``/proc/PID/stat`` field 22), or None once it is gone or
    a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else (pid, fields[19])


def descendants(pid: int) -> list[Ident]:
    """Every live descendant of ``pid``, parents first (from each thread's ``children``)."""
    found: list[Ident] = []
    todo = [pid]
    while todo:
        parent = todo.pop(0)
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            for kid in kids:
                ident = identity(kid)
                if ident is not None and ident not in found:
                    found.append(ident)
                    todo.append(kid)
    return found


def still_running(procs: Iterable[Ident]) -> list[int]:
    """The pids of ``procs`` that are still the same running process."""
    return [pid for pid, started in procs if identity(pid) == (pid, started)]
