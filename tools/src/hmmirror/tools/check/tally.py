"""Counting judged operations while a check runs, for ``hmmctl check --until-judged N``.

The translation oracle judges at each quiescent point, so its count is known
as the run goes; the data oracle judges every READ and every atomic only
once the target has exited. What it will judge is already in the agents' DMA
logs, flushed at each pause: ``LogTally`` reads only what each log gained
since its last look and counts the records that are sure to be judged, so that
a run can stop when translations checked plus those records reach N, and a run
asked for N judges at least N.
"""

from __future__ import annotations

import os

import numpy as np
from hmmirror.tools.check.stamps import READ, RECORD

#: The DMA log kinds sure to be judged, one judged operation per record: every READ is.
#: An atomic is judged only when no reset of its page may fall inside its flight
#: (``check.atomics``), which is known only at the end, so the stop does not count
#: atomics; those judged come on top (a million-operation run: about 1.5%).
SURELY_JUDGED = (READ,)


class LogTally:
    """Records sure to be judged in a set of growing DMA logs, read incrementally."""

    def __init__(self) -> None:
        self.offsets: dict[str, int] = {}
        self.count = 0

    def update(self, paths: list[str]) -> int:
        """Count the whole records appended to ``paths`` since the last call; the total."""
        kinds = np.array(SURELY_JUDGED, dtype=np.uint64)
        for path in paths:
            start = self.offsets.get(path, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    raw = f.read()
            except FileNotFoundError:
                continue
            whole = len(raw) - len(raw) % RECORD.itemsize
            if whole:
                records = np.frombuffer(raw[:whole], dtype=RECORD)
                self.count += int(np.count_nonzero(np.isin(records["kind"], kinds)))
            self.offsets[path] = start + whole
        return self.count


def cpu_seconds() -> float:
    """CPU time this process (the checker itself: its oracles and its driving) has used."""
    times = os.times()
    return times.user + times.system
