"""The client session without hmmd: its state machine, and cancellation while it waits.

Awaiting a cancelled background task must not swallow the waiter's own cancellation.
``Session.close`` cancels its heartbeat task and waits for it to end, and an
MR's deregistration waits for its background tasks; a caller cancelled during
that wait must end cancelled (it used to run on to the end, its CancelledError
swallowed with the task's). No hmmd is needed: nothing here sends a message.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import numpy as np
import pytest
from hmmirror.client import Access, MirrorEvicted, RemoteError, State
from hmmirror.client._reaper import reap
from hmmirror.client._table import VALID
from hmmirror.client.mirror import Mirror
from hmmirror.client.mlx5 import AccessFlags, MemoryRegion
from hmmirror.client.session import Session
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import Invalidate, Registered


def _stubborn(release: asyncio.Event) -> asyncio.Task[None]:
    """A task that, once cancelled, takes until ``release`` to end (as a heartbeat does
    while its request's reply is in flight)."""

    async def run() -> None:
        """Sleep; on cancellation, wait for ``release`` before ending cancelled."""
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await release.wait()
            raise

    return asyncio.ensure_future(run())


async def _cancel_while_waiting(waiter: asyncio.Future[Any], release: asyncio.Event) -> None:
    """Cancel ``waiter`` while it waits on a stubborn task, then let the task end."""
    await asyncio.sleep(0.05)
    assert not waiter.done()
    waiter.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, 5)


async def test_session_close_passes_on_the_callers_cancellation(tmp_path: Any) -> None:
    """A caller cancelled while ``close`` waits for the heartbeat task ends cancelled,
    and the socket is closed all the same."""
    session = Session(f"ipc://{tmp_path}/no-hmmd.sock", "cancel-test", 1.0)
    release = asyncio.Event()
    heartbeat = _stubborn(release)
    session._heartbeat = heartbeat
    await asyncio.sleep(0)
    closer = asyncio.ensure_future(session.close())
    await _cancel_while_waiting(closer, release)
    assert closer.cancelled()
    assert heartbeat.cancelled()
    assert session._closed  # the socket is closed even so


async def test_mr_deregistration_passes_on_the_callers_cancellation() -> None:
    """A caller cancelled while an MR waits out its background tasks ends cancelled."""
    mr = MemoryRegion(cast(Session, None), 1, 0x100, 1, 0x10000, 4096, AccessFlags.ON_DEMAND)
    release = asyncio.Event()
    background = _stubborn(release)
    mr._tasks.add(background)
    dereg = asyncio.ensure_future(mr._deregister())
    await _cancel_while_waiting(dereg, release)
    assert dereg.cancelled()
    assert background.cancelled()  # the wait's cancellation reaches the task, as before


async def test_reap_swallows_only_the_tasks_own_outcome() -> None:
    """A task that was cancelled, or failed, ends quietly for the caller that reaps it."""
    release = asyncio.Event()
    release.set()
    cancelled = _stubborn(release)
    await asyncio.sleep(0)
    cancelled.cancel()
    await reap(cancelled)
    assert cancelled.cancelled()

    async def fail() -> None:
        """Fail at once."""
        raise RuntimeError("the task's own failure")

    failed = asyncio.ensure_future(fail())
    await reap(failed)
    assert isinstance(failed.exception(), RuntimeError)


async def test_a_fence_and_a_loss_drop_every_mirror(tmp_path: Any) -> None:
    """FENCED evicts every mirror and starts one re-HELLO; LOST drops them; a close ends it."""
    session = Session(f"ipc://{tmp_path}/no-hmmd.sock", "state-test", 0.2)
    try:
        assert session.state is State.FENCED  # not welcomed yet: hmmd holds no session of ours
        reg = Registered(mirror=7, pid=1, start_time=0, seq=0)
        mirror = session.mirrors[7] = Mirror(session, reg, 0x10000, 4096, Access.READ)
        assert not session.rehello_if_fenced(RemoteError(ErrorCode.EFAULT, "not an ending"))
        assert mirror.dropped is None
        assert session.rehello_if_fenced(RemoteError(ErrorCode.FENCED, "fenced"))
        assert session.state is State.FENCED
        with pytest.raises(MirrorEvicted):
            mirror._check_live()
        hello = session._hello_task
        assert hello is not None
        assert session.rehello_if_fenced(RemoteError(ErrorCode.NO_SESSION, "again"))
        assert session._hello_task is hello  # one re-HELLO at a time
        await reap(hello)  # no hmmd: it fails quietly, and the session stays FENCED
        assert session.state is State.FENCED
        session._lose("test")
        assert session.state is State.LOST
    finally:
        await session.close()
    assert session.state is State.CLOSED


async def test_an_invalidate_over_several_mirrors_zaps_each_its_own_items(tmp_path: Any) -> None:
    """1.2: item i of an INVALIDATE is for mirror ``mirrors[i]``, or for ``mirror`` past the
    end of the list. Each mirror loses the pages of its own items only, records its own
    last seq, and one ACK n covers them all; an item for a mirror the session no longer
    has is skipped."""
    session = Session(f"ipc://{tmp_path}/no-hmmd.sock", "mirrors-test", 1.0)
    try:
        base = 0x10000
        mirrors = {}
        for mirror_id, pid in ((7, 1), (8, 2)):
            reg = Registered(mirror=mirror_id, pid=pid, start_time=0, seq=0)
            mirror = session.mirrors[mirror_id] = Mirror(session, reg, base, 4 * 4096, Access.READ)
            mirror.table[:] = VALID | np.uint64(0x1234)  # as faults would have left them
            mirror._held = 4
            mirrors[mirror_id] = mirror
        page = [(base + i * 4096, base + (i + 1) * 4096) for i in range(4)]
        items = ((3, *page[0], 0), (5, *page[1], 0), (9, *page[2], 0), (11, *page[3], 0))
        session._on_invalidate(Invalidate(n=4, mirror=7, items=items, mirrors=(7, 8, 99)))
        assert [int(e) >= int(VALID) for e in mirrors[7].table] == [False, True, True, False]
        assert [int(e) >= int(VALID) for e in mirrors[8].table] == [True, False, True, True]
        assert (mirrors[7].seq, mirrors[8].seq) == (11, 5)
        assert session._acks.drained() == 4
    finally:
        await session.close()
