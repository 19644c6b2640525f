"""The copy workers: order, the deadline, refusal while stuck, recovery, and the bounds.

In process, with jobs that block on an Event the test sets: the same shape as a
``process_vm_readv`` waiting in a target's userfaultfd, without needing one
(``tests/security/test_stuck_target.py`` has the real thing).
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import pytest
from hmmirror.daemon.dma import copier as copier_module
from hmmirror.daemon.dma.copier import Copier, CopyJob
from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.linux.procfs import ProcessView, start_time
from hmmirror.daemon.state import Mm
from hmmirror.proto.errors import ErrorCode

DEADLINE = 0.3
#: How long past a deadline an answer may come on a loaded machine.
SLACK = 2.0


@pytest.fixture
def mms() -> Iterator[list[Mm]]:
    """Three Mm objects of this very process (each gets its own worker)."""
    made: list[Mm] = []
    for _ in range(3):
        pid = os.getpid()
        made.append(Mm(pid=pid, start_time=start_time(pid), view=ProcessView(pid),
                       pidfd=os.pidfd_open(pid)))  # fmt: skip
    yield made
    for mm in made:
        mm.view.close()
        os.close(mm.pidfd)


def answers() -> tuple[list[CopyJob], asyncio.Event, Callable[[CopyJob], None]]:
    """A list the done callbacks append to, and an Event set on each answer."""
    got: list[CopyJob] = []
    event = asyncio.Event()

    def done(job: CopyJob) -> None:
        got.append(job)
        event.set()

    return got, event, done


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) until ``predicate()`` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def test_jobs_run_in_order_and_answer_on_the_loop(mms: list[Mm]) -> None:
    copier = Copier(DEADLINE)
    got, _, done = answers()
    loop_thread = threading.get_ident()
    ran_on: list[int] = []

    def job(n: int) -> Callable[[CopyJob], int]:
        def run(_: CopyJob) -> int:
            ran_on.append(threading.get_ident())
            return n

        return run

    for n in range(50):
        copier.submit(mms[0], job(n), done)
    await until(lambda: len(got) == 50)
    assert [j.result for j in got] == list(range(50))
    assert all(t != loop_thread for t in ran_on) and len(set(ran_on)) == 1
    assert copier.figures()["copy_threads"] == 1
    copier.close()
    await until(lambda: copier.figures()["copy_threads"] == 0)


async def test_a_blocked_job_is_answered_ebusy_and_its_mm_refused_until_it_returns(
    mms: list[Mm],
) -> None:
    copier = Copier(DEADLINE)
    got, _, done = answers()
    release = threading.Event()
    ran: list[str] = []

    def blocked(_: CopyJob) -> str:
        ran.append("blocked")
        release.wait(30)
        return "late"

    def queued(_: CopyJob) -> str:
        ran.append("queued")
        return "queued"

    t0 = time.monotonic()
    copier.submit(mms[0], blocked, done)
    copier.submit(mms[0], queued, done)
    other, _, other_done = answers()
    copier.submit(mms[1], lambda _: "other", other_done)  # another mm is served meanwhile
    await until(lambda: len(other) == 1)
    assert other[0].result == "other"
    await until(lambda: len(got) == 2, DEADLINE + SLACK)
    assert DEADLINE <= time.monotonic() - t0 <= DEADLINE + SLACK
    for job in got:
        assert job.timed_out and job.cancelled
        assert isinstance(job.error, RequestError) and job.error.code == ErrorCode.EBUSY
    with pytest.raises(RequestError) as refused:
        copier.submit(mms[0], queued, done)
    assert refused.value.code == ErrorCode.EBUSY
    assert copier.figures()["copy_stuck"] == 1 and copier.figures()["copy_timeouts"] == 1
    release.set()  # the blocked call returns: its result is dropped, the mm is served again
    await until(lambda: copier.figures()["copy_stuck"] == 0)
    copier.submit(mms[0], lambda _: "again", done)
    await until(lambda: len(got) == 3)
    assert got[2].result == "again" and not got[2].cancelled
    assert ran == ["blocked"], "a job answered EBUSY before it started must never run"
    copier.close()


async def test_forget_answers_esrch_and_ends_the_thread(mms: list[Mm]) -> None:
    copier = Copier(5.0)
    got, _, done = answers()
    gate = threading.Event()
    copier.submit(mms[0], lambda _: gate.wait(30), done)
    copier.submit(mms[0], lambda _: 1, done)
    copier.forget(mms[0])
    assert [getattr(j.error, "code", None) for j in got] == [ErrorCode.ESRCH] * 2
    gate.set()
    await until(lambda: copier.figures()["copy_threads"] == 0)
    assert len(got) == 2  # nothing answered twice


async def test_queue_and_per_user_bounds(mms: list[Mm], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(copier_module, "MAX_QUEUED", 3)
    monkeypatch.setattr(copier_module, "MAX_BUSY_PER_UID", 2)
    copier = Copier(5.0)
    got, _, done = answers()
    gate = threading.Event()
    for _ in range(3):
        copier.submit(mms[0], lambda _: gate.wait(30), done)
    with pytest.raises(RequestError, match="already queued"):
        copier.submit(mms[0], lambda _: 0, done)
    copier.submit(mms[1], lambda _: gate.wait(30), done)  # a second busy mm of this uid
    with pytest.raises(RequestError, match="processes of uid"):
        copier.submit(mms[2], lambda _: 0, done)  # a third one is refused
    gate.set()
    await until(lambda: len(got) == 4)
    copier.submit(mms[2], lambda _: 0, done)  # nothing in flight any more: served
    await until(lambda: len(got) == 5)
    assert copier.busy == {}
    copier.close()


async def test_a_stuck_worker_counts_for_its_user_after_its_mm_is_gone(
    mms: list[Mm], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(copier_module, "MAX_BUSY_PER_UID", 1)
    copier = Copier(DEADLINE)
    got, _, done = answers()
    release = threading.Event()
    copier.submit(mms[0], lambda _: release.wait(30), done)
    await until(lambda: len(got) == 1, DEADLINE + SLACK)
    copier.forget(mms[0])  # unmirrored while blocked: the blocked thread still counts
    with pytest.raises(RequestError, match="processes of uid"):
        copier.submit(mms[1], lambda _: 0, done)
    release.set()
    await until(lambda: not copier.busy and copier.figures()["copy_threads"] == 0)
    copier.submit(mms[1], lambda _: 0, done)
    await until(lambda: len(got) == 2)
    copier.close()


async def test_an_idle_thread_retires_and_a_new_copy_starts_another(
    mms: list[Mm], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(copier_module, "IDLE_EXIT", 0.05)
    copier = Copier(5.0)
    got, _, done = answers()
    copier.submit(mms[0], lambda _: 1, done)
    await until(lambda: len(got) == 1)
    await until(lambda: copier.figures()["copy_threads"] == 0)
    copier.submit(mms[0], lambda _: 2, done)
    await until(lambda: len(got) == 2)
    assert [j.result for j in got] == [1, 2]
    copier.close()


async def test_queued_bytes_are_bounded_per_user_and_released_when_answered(
    mms: list[Mm], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(copier_module, "MAX_QUEUED_BYTES_PER_UID", 100)
    copier = Copier(DEADLINE)
    got, _, done = answers()
    release = threading.Event()

    class Data:
        """Stands for a write's payload: it must be freed once its job is answered."""

    payload = Data()
    alive = weakref.ref(payload)

    def holds(data: Data) -> Callable[[CopyJob], Data]:
        return lambda _: data

    copier.submit(mms[0], lambda _: release.wait(30), done, 60)
    copier.submit(mms[0], holds(payload), done, 40)
    del payload
    with pytest.raises(RequestError, match="bytes of data"):
        copier.submit(mms[1], lambda _: 0, done, 1)  # the same user's other target
    copier.submit(mms[1], lambda _: 0, done)  # a copy holding no data is not counted
    await until(lambda: len(got) == 3, DEADLINE + SLACK)
    assert copier.queued_bytes == {}
    gc.collect()
    assert alive() is None, "an answered queued copy still holds its data"
    release.set()
    await until(lambda: copier.figures()["copy_stuck"] == 0)
    copier.close()
