"""Waiting for a background task to end without swallowing the waiter's own cancellation.

``with suppress(BaseException): await task`` hides two different CancelledErrors
behind one: the task's (it was cancelled, which is what the caller asked for)
and the caller's (someone cancelled the caller while it waited), and the second
must propagate or the caller's canceller waits for nothing. ``asyncio.wait``
keeps them apart: it never raises the task's outcome, so a CancelledError out
of it is always the caller's.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def reap(task: asyncio.Future[Any]) -> None:
    """Wait until ``task`` ends, however it ends (its result or failure is retrieved and
    dropped). If the caller is cancelled meanwhile, ``task`` is cancelled too, as an
    ``await task`` would, and the caller's CancelledError propagates."""
    try:
        await asyncio.wait((task,))
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not task.cancelled():
        task.exception()  # retrieved: a failed task must not log "never retrieved"
