"""The one quiescence wait: until hmmd has caught up and no invalidation or fault is in flight.

An oracle that compares agents' tables with ``/proc/PID/pagemap`` is only fair at a
quiescent point: the target stopped, hmmd's watcher caught up with it, and no
invalidation still waiting for acks. Counters that stopped moving are not enough
(an invalidation may be active while they hold still, and the demo's old wait,
which looked only at counters, could report false violations); so each look also
asks hmmd's inventory whether any mm has an invalidation active or an odd
(in-progress) sequence number, and the wait lasts at least twice the time hmmd
says its polls may take to see a change (``watch_lag_s``). The demo and the
checker both wait with :func:`quiesce`.
"""

from __future__ import annotations

import asyncio

from hmmirror.client.errors import AgentError
from hmmirror.client.session import inventory, status

__all__ = ["LOOK_INTERVAL", "STILL_LOOKS", "quiesce"]

#: Seconds between two looks.
LOOK_INTERVAL = 0.05
#: Looks in a row that must find the counters still and nothing in flight.
STILL_LOOKS = 2


async def quiesce(endpoint: str, limit: float) -> bool:
    """Wait until hmmd on ``endpoint`` is quiescent; False if it is not after ``limit`` s.

    Quiescent: the invalidation, fault and eviction counters unchanged and no mm
    with an active invalidation or an odd seq, for :data:`STILL_LOOKS` looks in a
    row, and for at least twice hmmd's ``watch_lag_s``: a change that raises no
    userfaultfd event (an mprotect, a write over the zero page) is seen only by a
    poll, whose interval grows to 20 times its cost on a loaded host, past any
    fixed number of looks. A look that cannot reach hmmd (it may be restarting)
    starts the count over.
    """
    last: tuple[object, ...] | None = None
    still = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    since = loop.time()  # the last look that saw a change (or the start)
    lag = 0.0  # the longest watcher lag hmmd reported since then
    while loop.time() < deadline:
        await asyncio.sleep(LOOK_INTERVAL)
        try:
            st = await status(endpoint, 2.0)
            mms, _ = await inventory(endpoint, 2.0)
        except AgentError:
            still, last = 0, None
            continue
        busy = any(int(m["active"]) or int(m["seq"]) % 2 for m in mms)
        now = (st["invalidations"], st.get("faults"), st.get("evictions"))
        looked = loop.time()
        if now == last and not busy:
            still += 1
            lag = max(lag, float(st.get("watch_lag_s", 0.0)))
        else:
            still, since, lag = 0, looked, float(st.get("watch_lag_s", 0.0))
        last = now
        if still >= STILL_LOOKS and looked - since >= 2 * lag:
            return True
    return False
