"""Copies into and out of targets, off the event loop: one worker thread per mm, with a deadline.

A ``process_vm_readv``/``writev`` (a populate, a DMA, an atomic) waits in the
target's page fault for as long as the fault takes: forever when the target's
own userfaultfd never answers, or when the FUSE server behind a file mapping is
stopped. That wait is killable only, so no deadline can interrupt it. Every
copy therefore runs on a worker thread of its target's mm, and is answered
EBUSY once ``copy_deadline`` has passed since it was submitted. The worker is
then *stuck*: hmmd abandons the call (it returns when the target exits or its
uffd is closed, and its result is dropped), refuses that mm's later copies at
once, and serves every other mm on its own worker.

One worker per mm runs that mm's copies in submission order, so atomics on one
target never interleave. A worker's thread is started on the first copy and
retires after ``IDLE_EXIT`` s without one; its threads are daemon threads, so
neither an idle nor a stuck one can hold up hmmd's exit. Thread count is
bounded: at most ``MAX_THREADS`` in all, and at most ``MAX_BUSY_PER_UID`` mms
of one user's targets with copies queued or stuck at a time, so one user's
blocking targets can never take the threads everyone else needs. Memory is
bounded too: the data of queued writes counts against their target user's
``MAX_QUEUED_BYTES_PER_UID`` (a read takes its buffer only when it runs), and a
copy answered without its result drops its data at once; only a call that is
still blocked keeps what it was given (one request's worth per stuck thread).

Only the thread hop is paid, and once per batch rather than per copy: the copies
submitted in one turn of the loop go to their worker together at its end (a
worker woken at the first would fight the loop for the GIL while it dispatches
the rest), and one ``call_soon_threadsafe`` brings back whatever finished since
the loop last looked. Everything else (checks, replies, timers) stays on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import select
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.linux import procfs
from hmmirror.daemon.state import Mm
from hmmirror.proto.errors import ErrorCode

log = logging.getLogger(__name__)

#: A worker's thread exits after this long without a copy (a later copy starts a new one).
IDLE_EXIT = 5.0
#: Copy threads hmmd runs at most, idle, busy and stuck together.
MAX_THREADS = 256
#: Mms of one user's targets that may have copies queued, running or stuck at once.
MAX_BUSY_PER_UID = 16
#: Copies queued for one mm at most; beyond it the request is answered EBUSY.
MAX_QUEUED = 1024
#: Bytes of write data queued for one user's targets at most, beyond it EBUSY.
MAX_QUEUED_BYTES_PER_UID = 64 << 20


class CopyJob:
    """One copy: ``fn`` runs on the worker, ``done`` on the loop once it finished or timed out."""

    __slots__ = (
        "buffer", "cancelled", "deadline", "done", "error", "fn", "nbytes", "pidfd", "result",
        "timed_out",
    )  # fmt: skip

    def __init__(
        self,
        fn: Callable[[CopyJob], Any],
        done: Callable[[CopyJob], None],
        deadline: float,
        nbytes: int = 0,
    ) -> None:
        self.fn = fn
        self.done = done
        self.deadline = deadline
        #: Bytes of data the job holds while queued (counted for its target's user).
        self.nbytes = nbytes
        #: A buffer the job took when it ran (the loop frees its pages if it is abandoned).
        self.buffer: Any = None
        #: The target's pidfd while ``fn`` runs: the worker thread's own copy, which stays
        #: open however long the call blocks (the mm's own may be closed meanwhile).
        self.pidfd = -1
        self.result: Any = None
        self.error: Exception | None = None
        #: Set on the loop once the job was answered without its result: the worker skips it,
        #: or drops what it returns. A job that already runs may still complete.
        self.cancelled = False
        #: The job was answered EBUSY at its deadline; whatever it was given (a buffer) may
        #: still be written by the abandoned call.
        self.timed_out = False


def _dropped(_: CopyJob) -> None:
    """What an answered job's ``fn`` becomes: its data is released, and it never runs."""


class Worker:
    """The copies of one mm: a FIFO served by one thread, and the loop's view of them."""

    def __init__(self, copier: Copier, mm: Mm, uid: int) -> None:
        self.copier = copier
        self.mm = mm
        self.pid = mm.pid
        self.uid = uid
        self.queue: queue.SimpleQueue[CopyJob | None] = queue.SimpleQueue()
        #: Submitted and not yet answered, oldest first (loop only).
        self.outstanding: deque[CopyJob] = deque()
        #: Finished on the thread, not yet seen by the loop (the thread appends).
        self.finished: deque[CopyJob] = deque()
        self.wake_pending = False
        #: Submitted in this turn of the loop, handed to the thread at its end (loop only).
        self.batch: list[CopyJob] = []
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        #: The abandoned job the thread is blocked in (loop only); None while not stuck.
        self.stuck: CopyJob | None = None
        self.stuck_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.forgotten = False

    # --- on the loop ------------------------------------------------------------------------

    def put(self, job: CopyJob) -> None:
        """Queue ``job`` for the thread at the end of this turn of the loop (the thread is
        started now if it is not running, so a failure to start refuses this copy)."""
        if self.thread is None:
            with self.lock:  # the thread decides to retire under the same lock
                if self.thread is None:
                    self.thread = self.copier.start_thread(self)
        if not self.batch:
            self.copier.loop.call_soon(self.flush)
        self.batch.append(job)

    def flush(self) -> None:
        """Hand this turn's copies to the thread (restarting it if it retired meanwhile)."""
        jobs, self.batch = self.batch, []
        if self.forgotten or not jobs:
            return  # its mm is gone: they were answered already
        try:
            with self.lock:
                if self.thread is None:
                    self.thread = self.copier.start_thread(self)
                for job in jobs:
                    self.queue.put(job)
        except RuntimeError as exc:  # its thread retired and no new one could start
            log.warning("no copy thread for pid %d: %s", self.pid, exc)
            had = bool(self.outstanding)
            self.cancel_all(RequestError(ErrorCode.EBUSY, f"no copy thread: {exc}"))
            if had:
                self.copier.idle(self)

    def drain(self) -> None:
        """Hand what the thread finished to its ``done`` callbacks (on the loop)."""
        self.wake_pending = False
        while self.finished:
            job = self.finished.popleft()
            if job.cancelled:
                if job is self.stuck:  # the blocked call returned: serve this mm again
                    log.info(
                        "a copy of pid %d returned after %.1f s blocked",
                        self.pid,
                        self.copier.loop.time() - self.stuck_since,
                    )
                    self.stuck = None
                    self.copier.idle(self)
                continue
            self.outstanding.popleft()  # FIFO: the job that finished is the oldest
            if not self.outstanding:
                self.copier.idle(self)
            self.copier.answer(job, self.uid)

    def expire(self) -> None:
        """The oldest copy's deadline: answer every outstanding copy EBUSY if it is not done."""
        self.timer = None
        self.drain()  # what finished but was not seen yet is not late
        if not self.outstanding:
            return
        loop = self.copier.loop
        head = self.outstanding[0]
        if loop.time() < head.deadline:
            self.timer = loop.call_at(head.deadline, self.expire)
            return
        self.stuck = head
        self.stuck_since = loop.time()
        self.copier.timeouts += 1
        log.warning(
            "a copy of pid %d is blocked in the target's page fault for %g s: its %d queued "
            "copies are answered EBUSY, later ones refused until it returns",
            self.pid,
            self.copier.deadline,
            len(self.outstanding),
        )
        jobs = list(self.outstanding)
        self.outstanding.clear()
        for job in jobs:
            job.fn = _dropped  # the blocked call keeps its own reference while it runs
        error = RequestError(
            ErrorCode.EBUSY,
            f"copy of process {self.pid} did not finish in {self.copier.deadline:g} s: its "
            "pages do not come in (a userfaultfd or a file server that does not answer); "
            "a write may still land",
        )
        for job in jobs:
            job.cancelled = job.timed_out = True
            job.error = error
            self.copier.answer(job, self.uid)

    def cancel_all(self, error: RequestError) -> None:
        """Answer every outstanding copy with ``error`` (the mm is gone)."""
        jobs = list(self.outstanding)
        self.outstanding.clear()
        for job in jobs:
            job.fn = _dropped
            job.cancelled = True
            job.error = error
            self.copier.answer(job, self.uid)

    # --- on the worker thread -----------------------------------------------------------------

    def run(self, pidfd: int) -> None:
        """The thread: run queued copies in order; retire when idle; exit on None."""
        alive = select.poll()
        alive.register(pidfd, select.POLLIN)
        try:
            while True:
                try:
                    job = self.queue.get(timeout=IDLE_EXIT)
                except queue.Empty:
                    with self.lock:
                        if self.queue.empty():
                            self.thread = None
                            return
                    continue
                if job is None:
                    return
                if not job.cancelled:
                    try:
                        # The pidfd turns readable once the process exited: its pid may then
                        # name another process by the time the copy runs. Copy nothing.
                        if alive.poll(0):
                            raise ProcessLookupError(self.pid, "the process has exited")
                        job.pidfd = pidfd
                        job.result = job.fn(job)
                    except Exception as exc:  # reported on the loop, as the copy's failure
                        job.error = exc
                elif job is not self.stuck:
                    continue  # answered already, never started: nothing to report
                self.finished.append(job)
                if not self.wake_pending:
                    self.wake_pending = True
                    try:
                        self.copier.loop.call_soon_threadsafe(self.drain)
                    except RuntimeError:
                        return  # the loop is closed: hmmd is exiting
        finally:
            os.close(pidfd)
            with contextlib.suppress(RuntimeError):
                self.copier.loop.call_soon_threadsafe(self.copier.exited, self)


class Copier:
    """Every mm's worker: submit copies, enforce their deadline, bound the threads."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._loop: asyncio.AbstractEventLoop | None = None
        self.workers: dict[Mm, Worker] = {}
        #: Workers whose thread runs (or is blocked), including those of mms now gone.
        self.running: set[Worker] = set()
        #: Per target uid: how many of its mms have copies outstanding or stuck.
        self.busy: dict[int, int] = {}
        #: Per target uid: bytes of data its outstanding copies hold.
        self.queued_bytes: dict[int, int] = {}
        self.timeouts = 0
        self.refused = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the copies answer on (the running one at the first copy)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _refuse(self, message: str) -> RequestError:
        """Count a copy refused before it started; return its EBUSY."""
        self.refused += 1
        return RequestError(ErrorCode.EBUSY, message)

    def submit(
        self,
        mm: Mm,
        fn: Callable[[CopyJob], Any],
        done: Callable[[CopyJob], None],
        nbytes: int = 0,
    ) -> None:
        """Run ``fn(job)`` on ``mm``'s worker, then ``done(job)`` on the loop with its result,
        its error, or EBUSY at the deadline. ``nbytes``: the data the job holds until then.
        Raise RequestError(EBUSY) to refuse at once."""
        worker = self.workers.get(mm)
        if worker is None:
            worker = self._worker(mm)
        if worker.stuck is not None:
            raise self._refuse(
                f"a copy of process {mm.pid} has been blocked for "
                f"{self.loop.time() - worker.stuck_since:.1f} s in its page fault (the target's "
                "pages do not come in): its copies are refused until it returns"
            )
        outstanding = worker.outstanding
        held = self.queued_bytes.get(worker.uid, 0) + nbytes
        if nbytes and held > MAX_QUEUED_BYTES_PER_UID:
            raise self._refuse(
                f"copies into processes of uid {worker.uid} already hold "
                f"{held - nbytes} bytes of data; try again later"
            )
        if not outstanding:
            uid = worker.uid
            if self.busy.get(uid, 0) >= MAX_BUSY_PER_UID:
                raise self._refuse(
                    f"{MAX_BUSY_PER_UID} processes of uid {uid} already have copies in flight "
                    "or blocked; try again later"
                )
            self.busy[uid] = self.busy.get(uid, 0) + 1
        elif len(outstanding) >= MAX_QUEUED:
            raise self._refuse(f"{MAX_QUEUED} copies of process {mm.pid} are already queued")
        job = CopyJob(fn, done, self.loop.time() + self.deadline, nbytes)
        outstanding.append(job)
        try:
            worker.put(job)
        except RuntimeError as exc:  # no thread could be started (thread limit of the host)
            outstanding.pop()
            if not outstanding:
                self.idle(worker)
            raise self._refuse(f"no copy thread for process {mm.pid}: {exc}") from exc
        if nbytes:
            self.queued_bytes[worker.uid] = held
        if worker.timer is None:
            worker.timer = self.loop.call_at(job.deadline, worker.expire)

    def run(self, mm: Mm, fn: Callable[[CopyJob], Any]) -> asyncio.Future[CopyJob]:
        """``submit`` as a future of the finished (or timed-out) job."""
        fut: asyncio.Future[CopyJob] = self.loop.create_future()

        def done(job: CopyJob) -> None:
            if not fut.done():
                fut.set_result(job)

        self.submit(mm, fn, done)
        return fut

    def answer(self, job: CopyJob, uid: int) -> None:
        """Run ``job.done`` (once per job); a failing callback is logged, never lost."""
        if job.nbytes:
            left = self.queued_bytes.get(uid, 0) - job.nbytes
            if left > 0:
                self.queued_bytes[uid] = left
            else:
                self.queued_bytes.pop(uid, None)
        try:
            job.done(job)
        except Exception:
            log.exception("completing a copy failed")

    def idle(self, worker: Worker) -> None:
        """``worker`` has nothing outstanding and is not stuck: its uid's busy count drops."""
        if worker.stuck is not None:
            return
        left = self.busy.get(worker.uid, 0) - 1
        if left > 0:
            self.busy[worker.uid] = left
        else:
            self.busy.pop(worker.uid, None)

    def _worker(self, mm: Mm) -> Worker:
        """A new worker for ``mm`` (its thread starts with the first copy)."""
        if mm.closed or mm.released:
            raise RequestError(ErrorCode.ESRCH, f"process {mm.pid} has exited")
        worker = Worker(self, mm, procfs.real_uid(mm.pid))
        self.workers[mm] = worker
        return worker

    def start_thread(self, worker: Worker) -> threading.Thread:
        """Start ``worker``'s thread (under its lock); RuntimeError beyond ``MAX_THREADS``."""
        if len(self.running) >= MAX_THREADS:
            raise RuntimeError(f"hmmd already runs {MAX_THREADS} copy threads")
        try:
            pidfd = os.dup(worker.mm.pidfd)  # the thread's own: the mm's may close meanwhile
        except OSError as exc:
            raise RuntimeError(f"no pidfd for a copy thread: {exc}") from exc
        thread = threading.Thread(
            target=worker.run, args=(pidfd,), name=f"copy-{worker.pid}", daemon=True
        )
        try:
            thread.start()
        except BaseException:
            os.close(pidfd)
            raise
        self.running.add(worker)
        return thread

    def exited(self, worker: Worker) -> None:
        """``worker``'s thread ended (on the loop)."""
        if worker.thread is None or worker.forgotten:
            self.running.discard(worker)

    def forget(self, mm: Mm) -> None:
        """``mm`` is gone: answer its outstanding copies ESRCH, let its thread end."""
        worker = self.workers.pop(mm, None)
        if worker is None:
            return
        worker.forgotten = True
        worker.batch = []
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        had = bool(worker.outstanding)
        worker.cancel_all(
            RequestError(ErrorCode.ESRCH, f"process {mm.pid} exited or is no longer mirrored")
        )
        if had:
            self.idle(worker)
        # A stuck worker keeps counting for its uid until its call returns (``drain``): a
        # target that is mirrored again gets a new worker, never more blocked threads.
        with worker.lock:
            if worker.thread is not None:
                worker.queue.put(None)

    def close(self) -> None:
        """hmmd stops: every worker's thread is told to end (a blocked one dies with hmmd)."""
        for mm in list(self.workers):
            self.forget(mm)

    def figures(self) -> dict[str, int]:
        """Counters for ``status``: threads, stuck workers, timeouts, refusals."""
        return {
            "copy_threads": len(self.running),
            "copy_stuck": sum(1 for w in self.running if w.stuck is not None),
            "copy_timeouts": self.timeouts,
            "copy_refused": self.refused,
        }
