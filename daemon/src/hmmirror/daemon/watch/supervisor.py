"""The supervisor: opens a target's mm, starts what watches it, and ends it when it goes.

``attach`` opens the mm of a process (pid and start time checked against pid
reuse), registers it, and starts its watchers: the pidfd for its exit, the
proc watcher's poll loop, and a userfaultfd watch if one can be acquired. When
the process exits or runs a new image (RELEASE), or its watcher fails (EVICT),
every mirror is told through the fan-out, then the mirrors and the mm are
dropped. It is the proc watcher's ``Keeper``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.invalidation import Invalidator
from hmmirror.daemon.linux.procfs import ProcessView, start_time
from hmmirror.daemon.registry import Registry
from hmmirror.daemon.state import Mm
from hmmirror.daemon.watch.acquire import Acquirer
from hmmirror.daemon.watch.proc import ProcWatch
from hmmirror.daemon.watch.uffd import Spawn
from hmmirror.daemon.watch.uffd import cover as cover_with_uffd
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import Event


class Supervisor:
    """Starts and stops everything that watches each mm."""

    def __init__(
        self,
        registry: Registry,
        invalidator: Invalidator,
        acquirer: Acquirer,
        spawn: Spawn,
        zero_pfn: int,
        poll: tuple[float, float],
        capacity: Callable[[], tuple[int, int]],
        counters: dict[str, int],
    ) -> None:
        self.registry = registry
        self.invalidator = invalidator
        self.acquirer = acquirer
        self.spawn = spawn
        self.zero_pfn = zero_pfn
        #: The proc watcher's poll interval bounds (``poll_min``, ``poll_max``).
        self.poll = poll
        #: How many mms hmmd may watch, and the descriptor limit that says so.
        self.capacity = capacity
        self.counters = counters

    def attach(self, pid: int, wanted_start: int) -> Mm:
        """The Mm of process ``pid`` (start time checked), reused or newly opened and watched."""
        mms = self.registry.mms
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError as exc:
            raise RequestError(ErrorCode.ESRCH, f"no process {pid}") from exc
        except OSError as exc:
            raise RequestError(ErrorCode.ESRCH, f"cannot open process {pid}: {exc}") from exc
        try:
            st = start_time(pid)
            if wanted_start and st != wanted_start:
                raise RequestError(
                    ErrorCode.ESRCH,
                    f"process {pid} started at {st}, not {wanted_start}: pid reused",
                )
            mm = mms.get((pid, st))
            if mm is not None and not mm.released and mm.view.replaced():
                self.exited(mm)  # execve gave the process a new mm: RELEASE the old one
            if mm is not None and mm.released:
                # Its RELEASE is still out (waiting for acks): the process, alive since
                # pidfd_open found it, runs a new image (execve keeps pid and start time).
                # The old Mm finishes on its own; the new one takes the key (drop_mm only
                # removes its own entry). A process really gone fails the checks below.
                del mms[mm.key]
                mm = None
            if mm is not None:
                os.close(pidfd)
                return mm
            owners = self.registry.owners
            if owners is not None:  # first: another hmmd of the host may watch it (MOVED)
                owners.hold(pid, st)
            try:
                view = self._open_view(pid, st, len(mms))
            except BaseException:
                if owners is not None:
                    owners.drop(pid, st)
                raise
        except (ProcessLookupError, RequestError) as exc:
            os.close(pidfd)
            if isinstance(exc, RequestError):
                raise
            raise RequestError(ErrorCode.ESRCH, f"no process {pid}") from exc
        mm = Mm(pid=pid, start_time=st, view=view, pidfd=pidfd)
        mms[mm.key] = mm
        asyncio.get_running_loop().add_reader(pidfd, self.exited, mm)
        watch = ProcWatch(mm, self.zero_pfn, self.poll, self.invalidator, self)
        mm.watcher = self.spawn(watch.run())
        self.acquirer.attach(mm)
        return mm

    def _open_view(self, pid: int, st: int, watched: int) -> ProcessView:
        """The maps and pagemap of process (pid, st), if hmmd has room for one more."""
        most, nofile = self.capacity()
        if watched >= most:  # each one holds descriptors: keep headroom
            raise RequestError(
                ErrorCode.EBUSY,
                f"hmmd watches {watched} processes, the most its descriptor limit "
                f"({nofile}) leaves room for",
            )
        try:
            view = ProcessView(pid)
        except PermissionError as exc:
            raise RequestError(
                ErrorCode.PERMISSION_DENIED, f"hmmd may not read process {pid}"
            ) from exc
        except OSError as exc:
            raise RequestError(ErrorCode.ESRCH, f"process {pid} vanished: {exc}") from exc
        # The pid may have been reused since pidfd_open: check it still names st.
        try:
            same = start_time(pid) == st
        except ProcessLookupError:
            same = False
        if not same:
            view.close()
            raise RequestError(ErrorCode.ESRCH, f"process {pid} exited or was replaced")
        return view

    def cover(self, mm: Mm) -> None:
        """Register the VMAs under ``mm``'s mirrors with its uffds, if it has any."""
        cover_with_uffd(mm)

    def track_writes(self, mm: Mm) -> None:
        """Arm written-page tracking for ``mm``'s subscribed mirrors; start its scan loop."""
        assert mm.uffd is not None
        mm.uffd.track_writes()

    def exited(self, mm: Mm) -> None:
        """The mm is gone (the pidfd reports exit, or execve replaced it): RELEASE it once."""
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(mm.pidfd)
        if not mm.released:
            mm.released = True
            self.spawn(self._release(mm))

    def failed(self, mm: Mm) -> None:
        """The proc watcher failed: EVICT the mirrors it can no longer protect."""
        if not mm.released:
            mm.released = True
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(mm.pidfd)
            self.spawn(self._release(mm, Event.EVICT))

    async def _release(self, mm: Mm, event: Event = Event.RELEASE) -> None:
        """The mm is gone (RELEASE, ``mn_itree_release``) or can no longer be watched (EVICT):
        tell every mirror, then forget them and the mm."""
        self.counters["releases" if event == Event.RELEASE else "evictions"] += 1
        try:
            await self.invalidator.invalidate(mm, 0, 1 << 64, event)
        finally:  # whatever became of the announcement, nothing is left holding the mm
            for mirror in list(mm.mirrors):
                self.registry.drop_mirror(mirror)
            self.registry.drop_mm(mm)
