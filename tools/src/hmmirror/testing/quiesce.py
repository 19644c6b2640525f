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
from dataclasses import dataclass

from hmmirror.client.errors import AgentError
from hmmirror.client.session import inventory, status

__all__ = ["LOOK_INTERVAL", "STILL_LOOKS", "Settled", "quiesce"]

#: Seconds between two looks.
LOOK_INTERVAL = 0.05
#: Looks in a row that must find the counters still and nothing in flight.
STILL_LOOKS = 2
#: The Status counters that must stand still.
_COUNTERS = ("invalidations", "faults", "evictions")


@dataclass(frozen=True)
class Settled:
    """What a quiescence wait found: true when hmmd settled; else ``why`` says what the last
    look saw, so that a run that gives up can say what kept hmmd busy."""

    ok: bool
    why: str = ""

    def __bool__(self) -> bool:
        return self.ok


def _unsettled(busy: list[str], moved: str, unreachable: bool, lag: float, short: float) -> str:
    """The last look's reasons in words."""
    if unreachable:
        return "hmmd did not answer Status or Inventory within 2 s"
    reasons = []
    if busy:
        more = f" and {len(busy) - 3} more" if len(busy) > 3 else ""
        reasons.append("in flight: " + ", ".join(busy[:3]) + more)
    if moved:
        reasons.append(f"counters still moving ({moved})")
    if short > 0:
        reasons.append(f"still {short:.1f} s short of twice the watcher lag ({lag:.2f} s)")
    return "; ".join(reasons) or "no look found it still twice in a row"


async def quiesce(endpoint: str, limit: float) -> Settled:
    """Wait until hmmd on ``endpoint`` is quiescent; false, with why, if not after ``limit`` s.

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
    busy: list[str] = []
    moved, unreachable, short = "", False, 0.0
    while loop.time() < deadline:
        await asyncio.sleep(LOOK_INTERVAL)
        try:
            st = await status(endpoint, 2.0)
            mms, _ = await inventory(endpoint, 2.0)
        except AgentError:
            still, last, unreachable = 0, None, True
            continue
        unreachable = False
        busy = [
            f"mm {m['pid']} seq {m['seq']} active {m['active']}"
            for m in mms
            if int(m["active"]) or int(m["seq"]) % 2
        ]
        now = tuple(st.get(name) for name in _COUNTERS)
        moved = (
            ""
            if last is None or now == last
            else ", ".join(
                f"{name} {a}->{b}"
                for name, a, b in zip(_COUNTERS, last, now, strict=True)
                if a != b
            )
        )
        looked = loop.time()
        if now == last and not busy:
            still += 1
            lag = max(lag, float(st.get("watch_lag_s", 0.0)))
        else:
            still, since, lag = 0, looked, float(st.get("watch_lag_s", 0.0))
        last = now
        short = 2 * lag - (looked - since)
        if still >= STILL_LOOKS and short <= 0:
            return Settled(True)
    return Settled(False, _unsettled(busy, moved, unreachable, lag, short))
