"""Userfaultfd acquisition: how hmmd comes to hold a target's uffd, and starts watching with it.

A uffd reaches hmmd in one of four ways, tried in this order when an mm is
first mirrored: the target *offered* it earlier through the intake (``uffd`` or
``uffd strict`` on the door; kept in an ``OfferBook`` until its first mirror);
the target left an unconfigured one open, taken with ``pidfd_getfd``; hmmd
*injects* one with ptrace (``uffd = "inject"``); or a watched parent *forked*
and the child's uffd arrived with the FORK event (``uffd_fork = "adopt"``). The
``uffd = "off"`` setting turns all of it off. The watches themselves are
``watch.uffd.UffdWatch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from hmmirror.daemon import logfmt
from hmmirror.daemon.config import Config
from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.intake import OfferBook, default_path
from hmmirror.daemon.linux import userfaultfd
from hmmirror.daemon.linux.creds import sender_start_time
from hmmirror.daemon.linux.inject import InjectError
from hmmirror.daemon.linux.injector import inject_userfaultfd
from hmmirror.daemon.linux.procfs import start_time
from hmmirror.daemon.owners import Moved
from hmmirror.daemon.registry import Registry
from hmmirror.daemon.state import Mm, UffdWatcher
from hmmirror.daemon.watch.proc import FanOut
from hmmirror.daemon.watch.uffd import Spawn, UffdWatch, cover
from hmmirror.proto.intake import moved, parse_option
from hmmirror.transport import Door, Peer

log = logging.getLogger(__name__)

#: How many times (5 ms apart) a FORK's child is looked for before its uffd is closed.
ADOPT_ATTEMPTS = 200


class Acquirer:
    """Obtains targets' userfaultfds and starts the watches on them."""

    def __init__(
        self,
        registry: Registry,
        announcer: FanOut,
        spawn: Spawn,
        zero_pfn: int,
        mode: str,
        fork_policy: str,
        offer_limit: int,
    ) -> None:
        self.registry = registry
        self.announcer = announcer
        self.spawn = spawn
        self.zero_pfn = zero_pfn
        #: The ``uffd`` setting: "off", "expose" (offers and leftovers only) or "inject".
        self.mode = mode
        #: The ``uffd_fork`` setting: "adopt" keeps a FORK's child uffd, else it is closed.
        self.fork_policy = fork_policy
        #: Userfaultfds targets exposed before anything mirrored them (plain, strict).
        self.offers = OfferBook(offer_limit, on_leave=self._offer_left)
        self.strict_offers = OfferBook(offer_limit, on_leave=self._offer_left)
        #: Children whose uffd a FORK handed us (pid, start time), so no two FORKs claim one.
        self._adopted: set[tuple[int, int]] = set()
        self.refusals = 0
        self.last_refusal = ""
        #: A separate side door for userfaultfds (a tcp:// hmmd, or expose_socket set).
        self.intake: Door | None = None

    def open_intake(self, config: Config, on_ipc: bool) -> None:
        """Open the side door for userfaultfds where the transport's own door is not it: at
        ``expose_socket``, or at the default path of a tcp:// hmmd."""
        path = config.expose_socket or default_path(config.endpoint)
        if config.uffd == "off" or (path == default_path(config.endpoint) and on_ipc):
            return
        try:
            self.intake = Door.unix(path, {"uffd": self.on_door}, config.socket_group)
        except OSError as exc:  # the watchers still work; only exposing is unavailable
            log.warning("no userfaultfd intake at %s: %s", path, exc)

    def _offer_left(self, pid: int, st: int) -> None:
        """An offer was taken or closed: give back the claim it held."""
        if self.registry.owners is not None:
            self.registry.owners.drop(pid, st)

    def expire(self) -> None:
        """Close the offers nobody mirrored in time."""
        self.offers.expire()
        self.strict_offers.expire()

    def close(self) -> None:
        """Shutdown: close the side door and every offered uffd."""
        if self.intake is not None:
            self.intake.close()
        self.offers.close()
        self.strict_offers.close()

    # --- offers -------------------------------------------------------------------------------

    def on_door(self, peer: Peer, arg: str, fd: int, pidfd: int) -> str | None:
        """Door line ``uffd`` (or ``uffd strict``, the second userfaultfd strict-write mirrors
        need): a target hands hmmd a userfaultfd of its own."""
        try:
            strict = parse_option(arg)  # the intake's own rule (SPEC.md §1.6)
        except ValueError as exc:
            return str(exc)
        return self._on_exposed(peer, fd, pidfd, strict=strict)

    def _on_exposed(self, peer: Peer, fd: int, pidfd: int, strict: bool) -> str | None:
        """A target sent a userfaultfd: watch with it now, or keep it for its first mirror."""
        if self.mode == "off":
            return "hmmd runs with uffd = off"
        if not userfaultfd.is_userfaultfd(fd):
            return "the descriptor is not a userfaultfd"
        assert peer.pid is not None and peer.uid is not None
        try:
            st = sender_start_time(peer.pid, pidfd)  # the sender's, not a reused pid's
        except ProcessLookupError:
            return f"process {peer.pid} is gone"
        return self._take_fd(peer.pid, st, fd, strict, peer.uid)

    def _take_fd(self, pid: int, st: int, fd: int, strict: bool, uid: int) -> str | None:
        """Watch process (pid, st) with ``fd`` now if it is mirrored, else keep it for later."""
        mm = self.registry.mms.get((pid, st))
        if mm is not None and not mm.released:
            current = mm.strict_uffd if strict else mm.uffd
            if current is not None and not current.closed:
                return f"process {pid} is already watched through such a userfaultfd"
            if strict:
                self._watch_strict_with(mm, fd)
            else:
                self._watch_with(mm, fd, configured=False)
            return None
        owners = self.registry.owners
        if owners is None:
            return (self.strict_offers if strict else self.offers).put(pid, st, fd, uid)
        try:
            owners.hold(pid, st)  # the hmmd that holds a process's uffd is the one to watch it
        except Moved as exc:
            return moved(exc.owner)  # the target offers there (SPEC.md §1.6)
        except RequestError as exc:
            return exc.message
        try:
            refused = (self.strict_offers if strict else self.offers).put(pid, st, fd, uid)
        except BaseException:
            owners.drop(pid, st)
            raise
        if refused is not None:
            owners.drop(pid, st)
        return refused

    # --- the first mirror of an mm ------------------------------------------------------------

    def attach(self, mm: Mm) -> None:
        """Watch ``mm`` through a userfaultfd if the target offers one (``uffd`` config)."""
        fd = self._obtain(mm, self.offers, "userfaultfd")
        if fd is not None:
            self._watch_with(mm, fd, configured=False)

    def strict_watch(self, mm: Mm) -> UffdWatcher | None:
        """``mm``'s strict-write watch, obtained now if the target offers a second uffd."""
        if mm.strict_uffd is not None and not mm.strict_uffd.closed:
            return mm.strict_uffd
        fd = self._obtain(mm, self.strict_offers, "strict userfaultfd")
        if fd is not None:
            self._watch_strict_with(mm, fd)
        watch = mm.strict_uffd
        return watch if watch is not None and not watch.closed else None

    def _obtain(self, mm: Mm, offers: OfferBook, what: str) -> int | None:
        """A userfaultfd of ``mm``'s process, now ours: one it offered (``offers``), an
        unconfigured one it left open, or (``uffd = "inject"``) one created in it; else None."""
        if self.mode == "off":
            return None
        fd = offers.take(mm.pid, mm.start_time)
        if fd is not None:
            return fd
        for target_fd in userfaultfd.unconfigured_uffds(mm.pid):
            try:
                return userfaultfd.getfd(mm.pidfd, target_fd)
            except OSError as exc:
                log.info(
                    "pidfd_getfd of pid %d fd %d: %s", mm.pid, target_fd, exc,
                    extra=logfmt.fields(pid=mm.pid),
                )  # fmt: skip
        if self.mode != "inject":
            return None
        try:
            return inject_userfaultfd(mm.pid, mm.pidfd)
        except InjectError as exc:
            self.refusals += 1
            self.last_refusal = str(exc)
            log.warning("no %s injected: %s; proc watcher only", what, exc)
            return None

    def _watch_with(self, mm: Mm, fd: int, *, configured: bool) -> None:
        """Start ``mm``'s uffd watcher on ``fd`` (ours now); fall back to proc on failure."""
        try:
            mm.uffd = UffdWatch(
                mm, fd, self.zero_pfn, self.announcer, self.spawn, configured=configured,
                on_fork=self._adopt_child if self.fork_policy == "adopt" else None,
            )  # fmt: skip
        except OSError as exc:
            log.warning(
                "userfaultfd of pid %d unusable (%s): proc watcher only", mm.pid, exc,
                extra=logfmt.fields(pid=mm.pid),
            )  # fmt: skip
            with contextlib.suppress(OSError):
                os.close(fd)
            return
        log.info("watching pid %d through its userfaultfd", mm.pid, extra=logfmt.fields(pid=mm.pid))
        cover(mm)

    def _watch_strict_with(self, mm: Mm, fd: int) -> None:
        """Start ``mm``'s strict-write watch on ``fd`` (ours now)."""
        try:
            mm.strict_uffd = UffdWatch(
                mm, fd, self.zero_pfn, self.announcer, self.spawn, strict=True
            )
        except OSError as exc:
            log.warning(
                "strict userfaultfd of pid %d unusable: %s", mm.pid, exc,
                extra=logfmt.fields(pid=mm.pid),
            )  # fmt: skip
            with contextlib.suppress(OSError):
                os.close(fd)
            return
        cover(mm)

    # --- fork adoption ------------------------------------------------------------------------

    def _adopt_child(self, watch: UffdWatch, child_fd: int) -> bool:
        """FORK under policy "adopt": keep the child's uffd for when the child is mirrored.

        The event names no pid, and arrives before the kernel lists the child among
        its parent's children: the child is found a moment later, as the parent's
        newest child that no earlier FORK claimed.
        """
        self._find_child(watch.mm.pid, child_fd, 0)
        return True

    def _find_child(self, parent: int, child_fd: int, attempt: int) -> None:
        """Match ``child_fd`` to the parent's newest unclaimed child; retry briefly."""
        newest: tuple[int, int] | None = None
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    for child in f.read().split():
                        try:
                            st = start_time(int(child))
                        except ProcessLookupError:
                            continue
                        if (int(child), st) in self._adopted:
                            continue
                        if newest is None or st > newest[1]:
                            newest = (int(child), st)
        if newest is None:
            if attempt < ADOPT_ATTEMPTS:
                asyncio.get_running_loop().call_later(
                    0.005, self._find_child, parent, child_fd, attempt + 1
                )
            else:
                with contextlib.suppress(OSError):
                    os.close(child_fd)
            return
        self._adopted.add(newest)
        try:
            owner = os.stat(f"/proc/{newest[0]}").st_uid
        except OSError:
            owner = -1  # gone: the offer is dropped at the next sweep
        if self._take_fd(newest[0], newest[1], child_fd, False, owner) is not None:
            with contextlib.suppress(OSError):
                os.close(child_fd)  # the child is already watched through another uffd
            return
        log.info("adopted the userfaultfd of pid %d's child %d", parent, newest[0])
