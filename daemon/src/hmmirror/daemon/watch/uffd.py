"""The uffd watcher: a target's userfaultfd events become invalidations as they happen.

The kernel blocks the target thread in munmap, madvise(DONTNEED/FREE), mremap
and fork until the monitor has read the event, so these are seen within one
event-loop turn, not one poll interval later. REMOVE (DONTNEED, FREE) is read
before the pages are zapped; UNMAP and REMAP describe mappings already gone
(docs/ARCHITECTURE.md §A.1). mprotect, new VMAs and file-backed mappings raise no
event: the proc watcher keeps covering them, and each of its polls registers
the anonymous and shmem VMAs that appeared under a mirror, as does every fault
for the VMAs it hands out translations from, and, after an UNMAP, a few looks
within 64 ms at the range that went (a target that maps it again at once).

A *strict* watch is a second uffd, without WP_ASYNC, over the VMAs of
strict-write mirrors: the pages such a mirror holds are write-protected, a
write to one blocks the writing thread and arrives as a fault, and hmmd lifts
the protection only once every subscribed mirror has acked the invalidation
(``device_write`` lifts it around hmmd's own writes).

With a mirror subscribed to writes, the watch also scans the pages written
since its last scan (PAGEMAP_SCAN's written bits, armed per registered VMA)
and announces them as WRITTEN, adapting its rate to the target's.

The reader never blocks: every unread event stalls a target thread. The
syscalls are ``linux.userfaultfd``'s; changes go to an ``FanOut``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from hmmirror.daemon.linux import scan, userfaultfd
from hmmirror.daemon.linux.procfs import PAGE_SIZE
from hmmirror.daemon.linux.smaps import smaps_flags
from hmmirror.daemon.state import Mm, Span
from hmmirror.daemon.watch.proc import Change, FanOut, detect, merge, union
from hmmirror.proto.messages import Event

log = logging.getLogger(__name__)

#: Written-page scan interval bounds, in seconds: fastest while the target writes.
WRITTEN_SCAN_MIN, WRITTEN_SCAN_MAX = 0.002, 0.1
#: After an UNMAP (or REMAP) under a mirror, look for a new mapping there this long after
#: (each delay once, until one is registered): a target that maps the range again at once
#: (a munmap and mmap to recycle a slot, an allocator's) has its new VMA registered within
#: a millisecond or so, not one proc-watcher poll later (up to 50 ms, and 20 times the
#: poll's cost), in which its DONTNEEDs and munmaps would raise no event at all.
RECOVER_DELAYS = (0.001, 0.004, 0.016, 0.064)

#: Runs a coroutine as a task the daemon owns (and cancels at shutdown).
Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class UffdWatch:
    """One target's userfaultfd, registered over the VMAs its mirrors cover."""

    def __init__(
        self,
        mm: Mm,
        fd: int,
        zero_pfn: int,
        announcer: FanOut,
        spawn: Spawn,
        *,
        configured: bool = False,
        strict: bool = False,
        on_fork: Callable[[UffdWatch, int], bool] | None = None,
    ) -> None:
        self.mm = mm
        self.fd = fd
        self.zero_pfn = zero_pfn
        self.announcer = announcer
        self.spawn = spawn
        #: Strict mode: a write to a protected page waits for every subscriber's ack.
        self.strict = strict
        #: Offered each FORK's child uffd; returns True if it kept it (policy "adopt").
        self.on_fork = on_fork
        features = userfaultfd.STRICT_FEATURES if strict else userfaultfd.WATCH_FEATURES
        if not configured:
            userfaultfd.ensure_api(fd, features)
        os.set_blocking(fd, False)
        self._registered: set[tuple[int, int]] = set()
        self._refused: set[tuple[int, int]] = set()
        self._armed: set[tuple[int, int]] = set()
        """Registered VMAs whose written bits were cleared once: later scans report writes."""
        self._proven = False
        """Whether a VMA of the target showed our registration: the uffd acts on its mm."""
        self.events = dict.fromkeys(("unmap", "remove", "remap", "fork", "write_fault"), 0)
        self.written_runs = 0
        self.closed = False
        asyncio.get_running_loop().add_reader(fd, self._drain)

    def close(self) -> None:
        """Stop reading and close the fd: the registrations die with the last reference."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.fd)

    # --- registration -----------------------------------------------------------------------

    def cover(self) -> int:
        """Register every anon/shmem VMA under a mirror not registered yet; return how many.

        Whole VMAs are registered, so registration never splits one. File-backed
        VMAs (EINVAL) and VMAs another uffd holds (EBUSY) stay with the proc watcher.
        A strict watch covers only the strict mirrors' VMAs.
        """
        wanted = [(span.start, span.end) for span in self._spans()]
        return sum(self.cover_range(lo, hi) for lo, hi in union(wanted))

    def _spans(self) -> Iterator[Span]:
        """The spans of the mirrors this watch covers (a strict one: the strict mirrors')."""
        for mirror in list(self.mm.mirrors):
            if not self.strict or mirror.strict:
                yield from mirror.spans

    def release(self, lo: int, hi: int) -> None:
        """Unregister the VMA [lo, hi) from this uffd, so the strict one can take it."""
        if (lo, hi) in self._registered:
            with contextlib.suppress(OSError):
                userfaultfd.unregister(self.fd, lo, hi - lo)
            self._forget(lo, hi)
        self._refused.discard((lo, hi))

    def protect(self, start: int, end: int) -> None:
        """Write-protect [start, end) (strict watch): the next write there is a fault."""
        for lo, hi in self._registered:
            a, b = max(lo, start), min(hi, end)
            if a < b:
                userfaultfd.writeprotect(self.fd, a, b - a, True)

    def unprotect(self, start: int, end: int, wake: bool = True) -> None:
        """Lift the protection of [start, end), waking the writers blocked there."""
        for lo, hi in self._registered:
            a, b = max(lo, start), min(hi, end)
            if a < b:
                with contextlib.suppress(OSError):  # the VMA went meanwhile: nobody waits
                    userfaultfd.writeprotect(self.fd, a, b - a, False, wake)

    def cover_range(self, start: int, end: int) -> int:
        """``cover`` for the VMAs of [start, end) only (a fault registers what it hands out)."""
        if self.closed:
            return 0
        try:
            vmas = self.mm.view.maps_range(start, end)
        except ProcessLookupError:
            return 0
        added = 0
        for lo, hi in zip(vmas.starts.tolist(), vmas.ends.tolist(), strict=True):
            key = (lo, hi)
            if key in self._registered or key in self._refused:
                continue
            if self.strict and self.mm.uffd is not None and self.mm.uffd is not self:
                self.mm.uffd.release(lo, hi)  # a VMA has one uffd: strict mode takes it
            try:
                userfaultfd.register(self.fd, lo, hi - lo)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EBUSY, errno.ENOMEM):
                    raise
                self._refused.add(key)
                continue
            self._registered.add(key)
            if not self._proven and not self._other_holds(key):
                self._prove(lo, hi)
            added += 1
            if not self.strict and any(m.watch_writes for m in self.mm.mirrors):
                self._arm(key)
        return added

    def _other_holds(self, key: tuple[int, int]) -> bool:
        """Whether the mm's other watch (plain or strict) registered the VMA ``key``: its
        ``uw`` there would prove nothing of this one."""
        other = self.mm.uffd if self.strict else self.mm.strict_uffd
        return isinstance(other, UffdWatch) and other is not self and key in other._registered

    def _prove(self, lo: int, hi: int) -> None:
        """The target's VMA [lo, hi), just registered, must show it (``uw``): a uffd acts on
        the mm of the process that made it, whoever holds it, and one of another process's
        (left in the target's table, or offered by it) would register that mm instead and
        report none of the target's changes. OSError if it does not (the caller closes the
        watch: the proc watcher covers the mm); a VMA gone meanwhile proves nothing."""
        try:
            flags = next((f for a, b, f in smaps_flags(self.mm.pid) if (a, b) == (lo, hi)), None)
        except OSError:
            return  # the process is going: its RELEASE follows
        if flags is None:
            return  # changed meanwhile: the next registration tries again
        if b"uw" not in flags:
            for a, b in self._registered:  # leave the other mm as it was
                with contextlib.suppress(OSError):
                    userfaultfd.unregister(self.fd, a, b - a)
            raise OSError(errno.EBADF, f"the userfaultfd is not this process's (pid {self.mm.pid})")
        self._proven = True

    def _arm(self, key: tuple[int, int]) -> None:
        """Clear the written bits of a registered VMA: from now on, writes are reported."""
        try:
            scan.written(self.mm.view.pagemap_fd, key[0], key[1])
        except OSError:
            return  # it changed already; the next scan retries it
        self._armed.add(key)

    def _forget(self, start: int, end: int) -> None:
        """VMAs in [start, end) are gone: a new mapping there must be registered afresh."""
        for key in [k for k in self._registered | self._refused if k[0] < end and start < k[1]]:
            self._registered.discard(key)
            self._refused.discard(key)
            self._armed.discard(key)

    # --- written pages ----------------------------------------------------------------------

    def scan_written(self) -> list[Change]:
        """WRITTEN changes: pages written under subscribed mirrors since the last scan.

        A VMA's first scan only arms it (the kernel reports all of it as written
        then). Raises ProcessLookupError once the process is gone.
        """
        if self.closed:
            return []
        spans = [
            (span.start, span.end)
            for mirror in self.mm.mirrors
            if mirror.watch_writes and not mirror.dead
            for span in mirror.spans
        ]
        changes: list[Change] = []
        fd = self.mm.view.pagemap_fd
        for key in sorted(self._registered):
            lo, hi = key
            if not any(s < hi and lo < e for s, e in spans):
                continue
            try:
                runs = scan.written(fd, lo, hi)
            except OSError as exc:
                if exc.errno in (errno.ESRCH, errno.EBADF):
                    raise ProcessLookupError(self.mm.pid, str(exc)) from exc
                self._forget(lo, hi)  # the VMA changed under us: register it again next time
                continue
            if key not in self._armed:  # this scan only armed it
                self._armed.add(key)
                continue
            self.written_runs += len(runs)
            for a, b in runs:
                for s, e in spans:
                    if a < e and s < b:
                        changes.append((max(a, s), min(b, e), Event.WRITTEN))
        return merge(changes)

    def track_writes(self) -> None:
        """Arm written-page tracking for the mm's subscribed mirrors; start its scan loop."""
        mm = self.mm
        try:
            changes = self.scan_written()  # arms what is new; reports what others armed
        except ProcessLookupError:
            return
        if changes:
            self.announcer.announce(mm, changes)
        if mm.written is None or mm.written.done():
            mm.written = self.spawn(self._scan_loop())

    async def _scan_loop(self) -> None:
        """Get-and-clear written pages of subscribed mirrors, adapting to the write rate."""
        mm = self.mm
        lo, hi = WRITTEN_SCAN_MIN, WRITTEN_SCAN_MAX
        interval = lo
        try:
            while not mm.released and not mm.closed:
                watch = mm.uffd  # the mm's current watch: a new one may have replaced this one
                if watch is None or watch.closed or not any(m.watch_writes for m in mm.mirrors):
                    return
                mm.lag["written"] = interval
                await asyncio.sleep(interval)
                t0 = time.perf_counter()
                try:
                    changes = watch.scan_written()
                except ProcessLookupError:
                    return  # the pidfd reports the exit
                if changes:
                    self.announcer.announce(mm, changes)
                cost = time.perf_counter() - t0
                # Scan fast while the target writes, back off while it does not, <5% of a core.
                interval = lo if changes else min(hi, interval * 1.5)
                interval = max(interval, cost * 20)
                mm.lag["written"] = interval + cost
        finally:
            mm.lag.pop("written", None)

    # --- events, and strict write faults -----------------------------------------------------

    def _drain(self) -> None:
        """Read every queued event (releasing the target), then start the invalidations."""
        try:
            events = userfaultfd.read_events(self.fd)
        except OSError as exc:
            log.warning("userfaultfd of pid %d failed: %s; proc watcher only", self.mm.pid, exc)
            self.close()
            return
        changes: list[Change] = []
        forked = False
        for kind, a0, a1, a2 in events:
            if kind == userfaultfd.EVENT_PAGEFAULT:
                if self.strict and a0 & userfaultfd.PAGEFAULT_FLAG_WP:
                    self.events["write_fault"] += 1
                    self._write_fault(a1 & ~0xFFF)
                else:  # not ours to hold: let it go (a fault hmmd cannot resolve otherwise)
                    self.unprotect(a1 & ~0xFFF, (a1 & ~0xFFF) + 0x1000)
            elif kind == userfaultfd.EVENT_UNMAP:
                self.events["unmap"] += 1
                changes.append((a0, a1, Event.UNMAP))
                self._forget(a0, a1)
            elif kind == userfaultfd.EVENT_REMOVE:
                self.events["remove"] += 1
                changes.append((a0, a1, Event.CLEAR))
            elif kind == userfaultfd.EVENT_REMAP:
                self.events["remap"] += 1
                changes.append((a0, a0 + a2, Event.UNMAP))  # the source moved away
                self._forget(a0, a0 + a2)
            elif kind == userfaultfd.EVENT_FORK:
                self.events["fork"] += 1
                forked = True
                # The child's uffd, installed in our fd table. Policy "close" drops it (the
                # child's registrations die with it); "adopt" keeps it for the child.
                child_fd = a0 & 0xFFFFFFFF
                if self.on_fork is None or not self.on_fork(self, child_fd):
                    with contextlib.suppress(OSError):
                        os.close(child_fd)
        if forked:
            # fork write-protected the parent's private pages for COW: downgrade WRITE entries
            # now (PROTECTION_PAGE), not a poll later.
            with contextlib.suppress(ProcessLookupError):
                changes.extend(detect(self.mm, self.zero_pfn))
        if changes and not self.mm.released:
            self.announcer.announce(self.mm, changes)
            gone = [(lo, hi) for lo, hi, ev in changes if ev == Event.UNMAP]
            if gone:
                self._recover(gone, 0)

    def _recover(self, ranges: list[tuple[int, int]], attempt: int) -> None:
        """Register the new mappings under mirrors in ``ranges`` (unmapped a moment ago);
        look again later, up to ``len(RECOVER_DELAYS)`` times, while none is found."""
        if attempt:
            if self.closed or self.mm.released:
                return
            wanted = [
                (max(lo, span.start), min(hi, span.end))
                for span in self._spans()
                for lo, hi in ranges
            ]
            if sum(self.cover_range(a, b) for a, b in union(wanted)):
                return
        if attempt < len(RECOVER_DELAYS):
            asyncio.get_running_loop().call_later(
                RECOVER_DELAYS[attempt], self._recover, ranges, attempt + 1
            )

    def _write_fault(self, page: int) -> None:
        """A write to a strictly protected page: it proceeds once every subscriber acked."""
        end = page + PAGE_SIZE
        self.announcer.announce(
            self.mm, [(page, end, Event.WRITTEN)], then=lambda: self.unprotect(page, end)
        )


def cover(mm: Mm) -> None:
    """Register the VMAs under ``mm``'s mirrors with its uffds, if it has any."""
    for watch in (mm.strict_uffd, mm.uffd):  # strict first: it takes the VMAs it needs
        if watch is None or watch.closed:
            continue
        try:
            watch.cover()
        except OSError as exc:
            log.warning("userfaultfd of pid %d failed (%s): proc watcher only", mm.pid, exc)
            watch.close()


def guard_handed_out(mm: Mm, start: int, end: int, strict: bool) -> None:
    """[start, end) was just handed to a mirror (``strict``: a strict-write one): register
    its VMAs with ``mm``'s uffds and, for a strict mirror, write-protect it. A uffd that
    fails is closed (the proc watcher still covers its mm)."""
    watch = mm.strict_uffd if strict else None
    if watch is not None and not watch.closed:
        # The mirror may now hold these pages: the next write to them waits for its ack.
        try:
            watch.cover_range(start, end)
            watch.protect(start, end)
        except OSError as exc:
            log.warning("strict userfaultfd of pid %d failed: %s", mm.pid, exc)
            watch.close()
    watch = mm.uffd
    if watch is not None and not watch.closed:
        # A VMA mapped since the last poll raises no event until registered: register
        # it before the agent can hold a translation from it.
        try:
            watch.cover_range(start, end)
        except OSError as exc:
            log.warning("userfaultfd of pid %d failed (%s): proc only", mm.pid, exc)
            watch.close()


@contextlib.contextmanager
def device_write(mm: Mm, start: int, end: int) -> Iterator[None]:
    """Around hmmd's own write into the target: lift strict protection, then restore it.

    hmmd's process_vm_writev would otherwise fault on a protected page and wait
    for hmmd itself. A device write is not announced to strict mirrors first.
    """
    watch = mm.strict_uffd
    if watch is None or watch.closed:
        yield
        return
    watch.unprotect(start, end, wake=False)
    try:
        yield
    finally:
        if not watch.closed and any(
            m.strict and not m.dead and m.overlaps(start, end) for m in mm.mirrors
        ):
            with contextlib.suppress(OSError):
                watch.protect(start, end)
