"""``sync_range`` batching: the calls made in one loop tick travel as one message.

Calls for the same process, event and strictness made in the same tick are
collected, sent as ``sync_range`` requests of at most ``MAX_ITEMS`` ranges
each, and all of them return (or raise) when those are answered.
"""

from __future__ import annotations

import asyncio

from hmmirror.client.channel import Channel
from hmmirror.client.errors import RemoteError, SyncIncomplete
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import MAX_ITEMS, Event, Ok, SyncRange


class _Shared(asyncio.Future[None]):
    """A future many callers await together, which refuses to be cancelled.

    A cancelled waiter still gets its CancelledError (asyncio raises it when the
    task resumes), but cannot cancel the batch everyone else waits on: what
    ``asyncio.shield`` gives, without a wrapper future per caller.
    """

    def cancel(self, msg: object = None) -> bool:
        """Refuse: one waiter's cancellation must not cancel the shared batch."""
        return False


class SyncBatcher:
    """Coalesces ``sync_range`` calls on ``channel`` per loop tick."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._batches: dict[tuple[int, int, bool], tuple[list[tuple[int, int]], _Shared]] = {}
        self._tasks: set[asyncio.Future[None]] = set()

    def join(self, pid: int, start: int, end: int, event: Event, strict: bool) -> _Shared:
        """Add [start, end) of ``pid`` to this tick's batch; return the future its callers
        await (a plain call, not a coroutine: one frame less for each of many callers)."""
        if not 0 <= start < end <= 1 << 64:
            raise ValueError(f"sync_range [{start:#x}, {end:#x}) is empty or out of range")
        key = (pid, int(event), strict)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = ([], _Shared(loop=self._channel.loop))
            if len(self._batches) == 1:
                self._channel.loop.call_soon(self._flush)
        batch[0].append((start, end))
        return batch[1]

    def _flush(self) -> None:
        """Send this tick's batched calls, one task per (pid, event, strict)."""
        batches, self._batches = self._batches, {}
        for key, (ranges, fut) in batches.items():
            task = asyncio.ensure_future(self._send(*key, ranges, fut))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(
        self,
        pid: int,
        event: int,
        strict: bool,
        ranges: list[tuple[int, int]],
        fut: asyncio.Future[None],
    ) -> None:
        """Send one batch's ranges as SYNC_RANGE requests; settle ``fut`` with the outcome."""
        try:
            if len(ranges) <= MAX_ITEMS:  # one request: no gather, no task per request
                await self._channel.call(
                    SyncRange(pid=pid, ranges=tuple(ranges), event=event, strict=strict), Ok
                )
            else:
                await asyncio.gather(
                    *(
                        self._channel.call(
                            SyncRange(
                                pid=pid, ranges=tuple(ranges[i : i + MAX_ITEMS]), event=event,
                                strict=strict,
                            ),
                            Ok,
                        )
                        for i in range(0, len(ranges), MAX_ITEMS)
                    )
                )  # fmt: skip
        except RemoteError as exc:
            if not fut.done():
                failure = SyncIncomplete(exc.message) if exc.code == ErrorCode.INCOMPLETE else exc
                fut.set_exception(failure)
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
        else:
            if not fut.done():
                fut.set_result(None)
