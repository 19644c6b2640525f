"""The hmmd application: sessions, mirrors, watchers, and the dispatch of requests.

Inbound messages arrive from the transport's ``Server`` with the ``Connection``
they came on (its routing id and the peer the kernel or CURVE proved). They are
decoded and validated by the proto codec, then dispatched through ``HANDLERS``
(``handlers``), an explicit table from message class to handler; a wire string
never reaches ``getattr``. Handlers that must wait (fault, sync_range) run as
tasks; the rest run inline. Every failure becomes a typed ``error`` reply and,
for malformed or out-of-order input, a count in ``bad_messages``; nothing a
peer sends can stop the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from hmmirror.daemon import authz
from hmmirror.daemon.budget import busy, track_last
from hmmirror.daemon.config import Config
from hmmirror.daemon.dma.copier import Copier
from hmmirror.daemon.dma.service import DmaService
from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.frames import FrameTokens
from hmmirror.daemon.handlers import HANDLERS, UNGATED
from hmmirror.daemon.intake import OfferBook, default_path, is_userfaultfd
from hmmirror.daemon.invalidation import Invalidator
from hmmirror.daemon.limits import FdBudget
from hmmirror.daemon.linux import uffd
from hmmirror.daemon.linux.creds import Creds
from hmmirror.daemon.linux.inject import InjectError, inject_userfaultfd
from hmmirror.daemon.linux.procfs import (
    PAGE_SIZE,
    ProcessView,
    start_time,
    zero_pfn,
)
from hmmirror.daemon.linux.uffd import unconfigured_uffds
from hmmirror.daemon.metrics import MetricsServer
from hmmirror.daemon.policy import Policy, PolicyError
from hmmirror.daemon.state import Mirror, Mm, Session, UffdWatcher
from hmmirror.daemon.watch.proc import Change, detect
from hmmirror.daemon.watch.uffd import UffdWatch
from hmmirror.proto.codec import Buffer, Envelope, decode, encode
from hmmirror.proto.errors import ErrorCode, ProtocolError
from hmmirror.proto.messages import (
    Error,
    Event,
    Evicted,
    Message,
)
from hmmirror.transport import AllowDir, Connection, Door, Peer, Server, ServerKeys, Unreachable
from hmmirror.transport.budget import ReplyBudget, frame_bytes

log = logging.getLogger(__name__)
#: A local connection with no session and no message for this long (at least) is dropped.
IDLE_CONNECTION = 10.0
#: How many times (5 ms apart) a FORK's child is looked for before its uffd is closed.
ADOPT_ATTEMPTS = 200
#: Written-page scan interval bounds, in seconds: fastest while the target writes.
WRITTEN_SCAN_MIN, WRITTEN_SCAN_MAX = 0.002, 0.1


class Daemon:
    """One hmmd instance: owns the transport, every session, mm and mirror."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.epoch = secrets.token_hex(8)
        self.started = time.monotonic()
        self.zero_pfn = zero_pfn()
        #: This epoch's frame tokens: what agents without physical frames see as PFNs.
        self.frames = FrameTokens()
        self.sessions: dict[bytes, Session] = {}
        self.mms: dict[tuple[int, int], Mm] = {}
        self.mirrors: dict[int, Mirror] = {}
        self._next_session = 1
        self._next_mirror = 1
        self._tasks: set[asyncio.Task[Any]] = set()
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "messages",
                "bad_messages",
                "faults",
                "dma_reads",
                "dma_writes",
                "dma_atomics",
                "evictions",
                "releases",
                "registrations",
                "reply_evictions",
                "refusals",
            ),
            0,
        )
        self._rejections_logged = 0
        self.fds = FdBudget.raise_limit(config)
        tcp = config.endpoint.startswith("tcp://")
        self.allow = AllowDir(config.curve_allow) if tcp and config.curve_key else None
        uffd_door = {"uffd": self._on_uffd}
        self.transport = Server(
            config.endpoint,
            self.on_message,
            keys=ServerKeys.load(config.curve_key) if tcp and config.curve_key else None,
            allow=self.allow,
            insecure=config.insecure,
            group=config.socket_group,
            limits=self.fds.connection_limits,
            heartbeat_ms=config.heartbeat_ms,
            door_handlers=uffd_door if config.uffd != "off" else {},
            vouch=authz.vouch,
        )
        if tcp and not config.curve_key:
            log.warning(
                "%s is plain TCP (insecure = true): anyone who can reach it can mirror, "
                "and can disturb hmmd's other connections",
                self.transport.endpoint,
            )
        self.invalidator = Invalidator(
            self.transport, config.ack_deadline, self.evict, self._on_mm_idle
        )
        self.copier = Copier(config.copy_deadline)
        if config.copy_deadline > config.ack_deadline:
            log.warning(
                "copy_deadline %g s exceeds ack_deadline %g s: an agent whose DMA is blocked in "
                "a target is evicted for its held ACKs before it is answered EBUSY",
                config.copy_deadline,
                config.ack_deadline,
            )
        self.dma = DmaService(self.zero_pfn, self.start_invalidations, self.copier)
        #: Reply bytes queued or being prepared, per connection, against ``reply_cap``.
        self.budget = ReplyBudget(config.reply_cap, config.ack_deadline)
        self.stopping = asyncio.Event()
        #: Userfaultfds targets exposed before anything mirrored them (plain, strict).
        self.offers = OfferBook(self.fds.offers)
        self.strict_offers = OfferBook(self.fds.offers)
        #: Children whose uffd a FORK handed us (pid, start time), so no two FORKs claim one.
        self._adopted: set[tuple[int, int]] = set()
        #: A separate side door for userfaultfds (a tcp:// hmmd, or expose_socket set).
        self.intake: Door | None = None
        self.uffd_refusals = 0
        self.uffd_last_refusal = ""
        self.metrics = MetricsServer(self.status)
        self.policy = Policy.load(config.policy) if config.policy else None
        #: Who sent the message being handled, as the transport proved it, and what was read
        #: about it when it connected (a local agent's credentials).
        self.asking = Peer()
        self.asking_vouched: Creds | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def serve(self, ready: Callable[[str], None] | None = None) -> None:
        """Run until ``stop()``: drain the socket, sweep leases.

        Raises AddressInUse (another hmmd answers at the endpoint) or OSError before it
        is ready, with everything it opened closed again.
        """
        sweeper: asyncio.Task[Any] | None = None
        try:
            self.transport.start()
            path = self.config.expose_socket or default_path(self.config.endpoint)
            if self.config.uffd != "off" and (
                path != default_path(self.config.endpoint) or not self.transport.ipc
            ):
                try:
                    handlers = {"uffd": self._on_uffd}
                    self.intake = Door.unix(path, handlers, self.config.socket_group)
                except OSError as exc:  # the watchers still work; only exposing is unavailable
                    log.warning("no userfaultfd intake at %s: %s", path, exc)
            if self.config.metrics:
                await self.metrics.start(self.config.metrics)
                log.info("metrics on %s", self.metrics.url)
            if ready is not None:
                ready(self.transport.endpoint)
            sweeper = self.spawn(self._sweep_leases())
            await self.stopping.wait()
        finally:
            if sweeper is not None:
                sweeper.cancel()
            for task in list(self._tasks):
                task.cancel()
            for mm in list(self.mms.values()):
                self.drop_mm(mm)
            self.copier.close()
            self.metrics.close()
            if self.intake is not None:
                self.intake.close()
            self.offers.close()
            self.strict_offers.close()
            self.transport.close()

    def reload(self) -> None:
        """SIGHUP: read the policy file and the CURVE allow-list again (a bad policy file
        keeps the old one); logged either way."""
        if self.allow is not None:
            self.allow.reload()
            log.info("SIGHUP: the allow-list %s will be read again", self.allow.directory)
        if not self.config.policy:
            log.info("SIGHUP: no policy file; the kernel's rule applies")
            return
        try:
            policy = Policy.load(self.config.policy)
        except PolicyError as exc:
            log.error("SIGHUP: policy unchanged: %s", exc)
            return
        self.policy = policy
        log.info(
            "SIGHUP: policy %s read again: %d grant(s)", self.config.policy, len(policy.grants)
        )

    def stop(self) -> None:
        """Ask ``serve`` to return."""
        self.stopping.set()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task the daemon owns and cancels at shutdown."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        """Forget a finished task; log its exception if it failed."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("daemon task failed", exc_info=task.exception())

    # --- messaging ---------------------------------------------------------------------------

    def send(
        self,
        identity: bytes,
        msg: Message,
        re: int = 0,
        bulk: Sequence[Any] = (),
        copy: bool = True,
        reserved: int = 0,
    ) -> None:
        """Send ``msg`` to ``identity``, after any INVALIDATE queued for it (FIFO with replies).

        Its bytes count against the connection's reply cap until libzmq lets go of
        them, in place of the ``reserved`` bytes a bulk reply set aside.
        """
        session = self.sessions.get(identity)
        if session is not None and self.invalidator.has_queued(session):
            self.invalidator.flush(session)
        msg_id = session.take_id() if session is not None else 1
        frames = encode(msg, msg_id, re, bulk)
        budget = self.budget
        nbytes = frame_bytes(frames)
        tracker = track_last(frames) if budget.wants_tracker(identity, nbytes) else None
        try:
            self.transport.send(identity, frames, copy=copy)
        except Unreachable as exc:
            budget.unreserve(identity, reserved)
            log.info("reply %s to %r dropped: %s", msg.TYPE, identity, exc)
            if session is not None:
                self.evict(session, f"peer unreachable: {exc}")
            return
        budget.sent(identity, nbytes, tracker, reserved)

    def reserve(self, identity: bytes, nbytes: int, what: str) -> int:
        """Set aside ``nbytes`` of the connection's reply cap for a bulk reply; EBUSY past it.

        Returns ``nbytes``, to be passed to ``send`` (or given back with
        ``budget.unreserve`` if the reply is not sent).
        """
        if not self.budget.reserve(identity, nbytes):
            raise busy(self.budget, identity, what)
        return nbytes

    def reject(
        self, identity: bytes, code: ErrorCode, message: str, re: int, mtype: str, bad: bool
    ) -> None:
        """Answer with an error; count and log bad or out-of-order input (never its payload)."""
        if bad:
            self.counters["bad_messages"] += 1
            self._rejections_logged += 1
            level = logging.WARNING if self._rejections_logged <= 100 else logging.DEBUG
            log.log(
                level, "rejected %s id=%d from %r: %s (%s)", mtype, re, identity, code.name, message
            )
        self.send(identity, Error(code=int(code), message=message[:1024]), re=re)

    def on_message(self, conn: Connection, frames: Sequence[Buffer]) -> None:
        """Decode, authorise by session state, and dispatch one inbound message."""
        self.counters["messages"] += 1
        identity = conn.rid
        self.asking = conn.peer
        self.asking_vouched = conn.vouched
        try:
            env = decode(frames)
        except ProtocolError as exc:
            # exc.id names the request once its header was readable (0 before): the sender's
            # pending request then fails at once rather than timing out.
            self.reject(identity, exc.code, str(exc), exc.id, "message", bad=True)
            return
        entry = HANDLERS.get(type(env.msg))
        if entry is None:
            self.reject(
                identity, ErrorCode.UNKNOWN_MESSAGE, f"hmmd does not accept {env.type!r}",
                env.id, env.type, bad=True,
            )  # fmt: skip
            return
        handler, needs_session = entry
        session = self.sessions.get(identity)
        if session is not None:
            session.last_seen = time.monotonic()
        if needs_session and (session is None or session.fenced):
            code = ErrorCode.NO_SESSION if session is None else ErrorCode.FENCED
            self.reject(
                identity,
                code,
                f"{env.type} needs a live session: send hello",
                env.id,
                env.type,
                bad=True,
            )
            return
        if handler not in UNGATED and self.budget.full(identity):
            refusal = busy(self.budget, identity, env.type)
            self.reject(identity, refusal.code, refusal.message, env.id, env.type, bad=False)
            return
        try:
            result = handler(self, identity, session, env)
        except Exception as exc:  # a typed refusal, or a handler bug: answer and keep serving
            self.answer_failure(identity, env, exc)
            return
        if result is not None:
            self.spawn(self._finish(identity, env, result))

    async def _finish(self, identity: bytes, env: Envelope, work: Awaitable[None]) -> None:
        """Await a handler's deferred work; answer its failure with an error reply."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.answer_failure(identity, env, exc)

    def new_session_id(self) -> int:
        """A session id never used in this epoch."""
        self._next_session += 1
        return self._next_session - 1

    def new_mirror_id(self) -> int:
        """A mirror id never used in this epoch."""
        self._next_mirror += 1
        return self._next_mirror - 1

    def answer_failure(self, identity: bytes, env: Envelope, exc: Exception) -> None:
        """Answer a handler's failure: its typed error, or INTERNAL (logged) for a bug."""
        if isinstance(exc, RequestError):
            # Bad arguments are bad input, whether a cap or a range was violated; ESRCH,
            # NO_MIRROR or EPERM can follow from a race or a policy, not only from the peer.
            bad = exc.code in (ErrorCode.EINVAL, ErrorCode.TOO_LARGE)
            self.reject(identity, exc.code, exc.message, env.id, env.type, bad=bad)
            return
        log.error("%s id=%d from %r failed", env.type, env.id, identity, exc_info=exc)
        message = f"{env.type} failed: {exc}"
        self.reject(identity, ErrorCode.INTERNAL, message, env.id, env.type, bad=False)

    # --- sessions ----------------------------------------------------------------------------

    def evict(self, session: Session, reason: str) -> None:
        """Fence ``session``: drop its mirrors, forgive its acks, tell it (best effort)."""
        if session.fenced:
            return
        session.fenced = True
        self.counters["evictions"] += 1
        ids = tuple(session.mirrors)
        log.warning("evicting session %d (%s): %s", session.id, session.name, reason)
        self.invalidator.forgive(session)
        for mirror in list(session.mirrors.values()):
            self.drop_mirror(mirror)
        with contextlib.suppress(Unreachable):
            self.transport.send(
                session.identity,
                encode(Evicted(mirrors=ids[:4096], reason=reason[:256]), session.take_id()),
            )

    def close_session(self, session: Session) -> None:
        """Forget ``session`` (GOODBYE or a new HELLO), forgiving acks, dropping mirrors."""
        self.invalidator.forgive(session)
        for mirror in list(session.mirrors.values()):
            self.drop_mirror(mirror)
        self.sessions.pop(session.identity, None)

    async def _sweep_leases(self) -> None:
        """Each heartbeat interval: evict and forget the sessions past their lease, and those
        that left their queued replies unread past the ack deadline; drop the local
        connections silent as long; close userfaultfd offers that expired."""
        lease = self.config.lease
        silence = max(IDLE_CONNECTION, 4 * (lease + self.config.ack_deadline))
        while True:
            await asyncio.sleep(self.config.heartbeat_ms / 1000)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if now - session.last_seen > lease:
                    if not session.fenced:
                        self.evict(session, f"no heartbeat for {lease:g} s (lease expired)")
                    self.sessions.pop(session.identity, None)
            for conn in self.transport.idle(now - silence):
                # A local client silent that long, with no session, has gone (or will dial
                # again): its descriptors come back. A request never waits that long.
                # (A tcp connection cannot be closed from here: its record stays, bounded.)
                if conn.endpoint and conn.rid not in self.sessions:
                    self.transport.drop(conn.rid)
            self.offers.expire()
            self.strict_offers.expire()
            self._evict_stalled()

    def _evict_stalled(self) -> None:
        """Evict the sessions whose connection stayed at its reply cap without reading, and
        disconnect it: what libzmq still queues for it goes with the connection."""
        for identity, backlog in self.budget.sweep():
            session = self.sessions.get(identity)
            if session is not None and not session.fenced:
                self.counters["reply_evictions"] += 1
                self.evict(
                    session,
                    f"read none of its {backlog.queued >> 10} KiB of queued replies for "
                    f"{self.budget.deadline:g} s (reply_cap {self.budget.cap >> 10} KiB)",
                )
            # Disconnecting drops what libzmq still queues for it; it may knock again.
            self.transport.drop(identity)
            self.budget.forget(identity)

    # --- mms and mirrors ---------------------------------------------------------------------

    def attach_mm(self, pid: int, wanted_start: int) -> Mm:
        """The Mm of process ``pid`` (start time checked), reused or newly opened and watched."""
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
            mm = self.mms.get((pid, st))
            if mm is not None and not mm.released and mm.view.replaced():
                self._on_exit(mm)  # execve gave the process a new mm: RELEASE the old one
            if mm is not None and mm.released:
                # Its RELEASE is still out (waiting for acks): the process, alive since
                # pidfd_open found it, runs a new image (execve keeps pid and start time).
                # The old Mm finishes on its own; the new one takes the key (drop_mm only
                # removes its own entry). A process really gone fails the checks below.
                del self.mms[mm.key]
                mm = None
            if mm is not None:
                os.close(pidfd)
                return mm
            if len(self.mms) >= self.fds.mms:  # each one holds descriptors: keep headroom
                raise RequestError(
                    ErrorCode.EBUSY,
                    f"hmmd watches {len(self.mms)} processes, the most its descriptor limit "
                    f"({self.fds.nofile}) leaves room for",
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
        except (ProcessLookupError, RequestError) as exc:
            os.close(pidfd)
            if isinstance(exc, RequestError):
                raise
            raise RequestError(ErrorCode.ESRCH, f"no process {pid}") from exc
        mm = Mm(pid=pid, start_time=st, view=view, pidfd=pidfd)
        self.mms[mm.key] = mm
        asyncio.get_running_loop().add_reader(pidfd, self._on_exit, mm)
        mm.watcher = self.spawn(self._watch(mm))
        self._attach_uffd(mm)
        return mm

    # --- userfaultfd --------------------------------------------------------------------------

    def _on_uffd(self, peer: Peer, arg: str, fd: int, pidfd: int) -> str | None:
        """Door line ``uffd`` (or ``uffd strict``, the second userfaultfd strict-write mirrors
        need): a target hands hmmd a userfaultfd of its own."""
        if arg not in ("", "strict"):
            return f"unknown option {arg!r} of 'uffd' (only 'strict')"
        return self._on_exposed(peer, fd, strict=arg == "strict")

    def _on_exposed(self, peer: Peer, fd: int, strict: bool) -> str | None:
        """A target sent a userfaultfd: watch with it now, or keep it for its first mirror."""
        if self.config.uffd == "off":
            return "hmmd runs with uffd = off"
        if not is_userfaultfd(fd):
            return "the descriptor is not a userfaultfd"
        assert peer.pid is not None and peer.uid is not None
        try:
            st = start_time(peer.pid)
        except ProcessLookupError:
            return f"process {peer.pid} is gone"
        return self._take_fd(peer.pid, st, fd, strict, peer.uid)

    def _take_fd(self, pid: int, st: int, fd: int, strict: bool, uid: int) -> str | None:
        """Watch process (pid, st) with ``fd`` now if it is mirrored, else keep it for later."""
        mm = self.mms.get((pid, st))
        if mm is not None and not mm.released:
            current = mm.strict_uffd if strict else mm.uffd
            if current is not None and not current.closed:
                return f"process {pid} is already watched through such a userfaultfd"
            if strict:
                self._watch_strict_with(mm, fd)
            else:
                self._watch_with(mm, fd, configured=False)
            return None
        return (self.strict_offers if strict else self.offers).put(pid, st, fd, uid)

    def _attach_uffd(self, mm: Mm) -> None:
        """Watch ``mm`` through a userfaultfd if the target offers one (``uffd`` config)."""
        fd = self._obtain_uffd(mm, self.offers, "userfaultfd")
        if fd is not None:
            self._watch_with(mm, fd, configured=False)

    def _obtain_uffd(self, mm: Mm, offers: OfferBook, what: str) -> int | None:
        """A userfaultfd of ``mm``'s process, now ours: one it offered (``offers``), an
        unconfigured one it left open, or (``uffd = "inject"``) one created in it; else None."""
        if self.config.uffd == "off":
            return None
        fd = offers.take(mm.pid, mm.start_time)
        if fd is not None:
            return fd
        for target_fd in unconfigured_uffds(mm.pid):
            try:
                return uffd.getfd(mm.pidfd, target_fd)
            except OSError as exc:
                log.info("pidfd_getfd of pid %d fd %d: %s", mm.pid, target_fd, exc)
        if self.config.uffd != "inject":
            return None
        try:
            return inject_userfaultfd(mm.pid, mm.pidfd)
        except InjectError as exc:
            self.uffd_refusals += 1
            self.uffd_last_refusal = str(exc)
            log.warning("no %s injected: %s; proc watcher only", what, exc)
            return None

    def _watch_with(self, mm: Mm, fd: int, *, configured: bool) -> None:
        """Start ``mm``'s uffd watcher on ``fd`` (ours now); fall back to proc on failure."""
        try:
            mm.uffd = UffdWatch(
                mm, fd, self.zero_pfn, self.start_invalidations, configured=configured,
                on_fork=self._adopt_child if self.config.uffd_fork == "adopt" else None,
            )  # fmt: skip
        except OSError as exc:
            log.warning("userfaultfd of pid %d unusable (%s): proc watcher only", mm.pid, exc)
            with contextlib.suppress(OSError):
                os.close(fd)
            return
        log.info("watching pid %d through its userfaultfd", mm.pid)
        self.cover_with_uffd(mm)

    def track_writes(self, mm: Mm) -> None:
        """Arm written-page tracking for ``mm``'s subscribed mirrors; start its scan loop."""
        assert mm.uffd is not None
        try:
            changes = mm.uffd.scan_written()  # arms what is new; reports what others armed
        except ProcessLookupError:
            return
        if changes:
            self.start_invalidations(mm, changes)
        if mm.written is None or mm.written.done():
            mm.written = self.spawn(self._scan_written(mm))

    async def _scan_written(self, mm: Mm) -> None:
        """Get-and-clear written pages of subscribed mirrors, adapting to the write rate."""
        lo, hi = WRITTEN_SCAN_MIN, WRITTEN_SCAN_MAX
        interval = lo
        while not mm.released and not mm.closed:
            watch = mm.uffd
            if watch is None or watch.closed or not any(m.watch_writes for m in mm.mirrors):
                return
            await asyncio.sleep(interval)
            t0 = time.perf_counter()
            try:
                changes = watch.scan_written()
            except ProcessLookupError:
                return  # the pidfd reports the exit
            if changes:
                self.start_invalidations(mm, changes)
            cost = time.perf_counter() - t0
            # Scan fast while the target writes, back off while it does not, <5% of a core.
            interval = lo if changes else min(hi, interval * 1.5)
            interval = max(interval, cost * 20)

    def strict_watch(self, mm: Mm) -> UffdWatcher | None:
        """``mm``'s strict-write watch, obtained now if the target offers a second uffd."""
        if mm.strict_uffd is not None and not mm.strict_uffd.closed:
            return mm.strict_uffd
        fd = self._obtain_uffd(mm, self.strict_offers, "strict userfaultfd")
        if fd is not None:
            self._watch_strict_with(mm, fd)
        watch = mm.strict_uffd
        return watch if watch is not None and not watch.closed else None

    def _watch_strict_with(self, mm: Mm, fd: int) -> None:
        """Start ``mm``'s strict-write watch on ``fd`` (ours now)."""
        try:
            mm.strict_uffd = UffdWatch(
                mm, fd, self.zero_pfn, self.start_invalidations, on_write_fault=self._write_fault
            )
        except OSError as exc:
            log.warning("strict userfaultfd of pid %d unusable: %s", mm.pid, exc)
            with contextlib.suppress(OSError):
                os.close(fd)
            return
        self.cover_with_uffd(mm)

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

    def _write_fault(self, watch: UffdWatch, page: int) -> None:
        """A write to a strictly protected page: it proceeds once every subscriber acked."""
        end = page + PAGE_SIZE
        inv = self.invalidator.begin(watch.mm, [(page, end)], Event.WRITTEN)
        if inv.finished:
            watch.unprotect(page, end)
        else:
            inv.on_done.append(lambda: watch.unprotect(page, end))

    @contextlib.contextmanager
    def device_write(self, mm: Mm, start: int, end: int) -> Iterator[None]:
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

    def cover_with_uffd(self, mm: Mm) -> None:
        """Register the VMAs under ``mm``'s mirrors with its uffd, if it has one."""
        for watch in (mm.strict_uffd, mm.uffd):  # strict first: it takes the VMAs it needs
            if watch is None or watch.closed:
                continue
            try:
                watch.cover()
            except OSError as exc:
                log.warning("userfaultfd of pid %d failed (%s): proc watcher only", mm.pid, exc)
                watch.close()

    def drop_mirror(self, mirror: Mirror) -> None:
        """Forget ``mirror``; forget its mm too once nothing uses it."""
        mirror.dead = True
        mirror.session.mirrors.pop(mirror.id, None)
        self.mirrors.pop(mirror.id, None)
        mm = mirror.mm
        if mirror in mm.mirrors:
            mm.mirrors.remove(mirror)
        if not mm.mirrors and not mm.released and mm.active == 0:
            self.drop_mm(mm)

    def _on_mm_idle(self, mm: Mm) -> None:
        """An mm's windows all closed: forget it if its last mirror went meanwhile."""
        if not mm.mirrors and not mm.released:
            self.drop_mm(mm)

    def drop_mm(self, mm: Mm) -> None:
        """Stop watching ``mm`` and close its pidfd and view, once."""
        if mm.closed:
            return  # never close a pidfd number twice: it may belong to someone else by now
        mm.closed = True
        if self.mms.get(mm.key) is mm:
            del self.mms[mm.key]
        self.copier.forget(mm)
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(mm.pidfd)
        if mm.watcher is not None:
            mm.watcher.cancel()
        if mm.written is not None:
            mm.written.cancel()
        for watch in (mm.uffd, mm.strict_uffd):
            if watch is not None:
                watch.close()
        with contextlib.suppress(OSError):
            os.close(mm.pidfd)
        mm.view.close()

    def _on_exit(self, mm: Mm) -> None:
        """The mm is gone (the pidfd reports exit, or execve replaced it): RELEASE it once."""
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(mm.pidfd)
        if not mm.released:
            mm.released = True
            self.spawn(self._release(mm))

    async def _release(self, mm: Mm, event: Event = Event.RELEASE) -> None:
        """The mm is gone (RELEASE, ``mn_itree_release``) or can no longer be watched (EVICT):
        tell every mirror, then forget them and the mm."""
        self.counters["releases" if event == Event.RELEASE else "evictions"] += 1
        await self.invalidator.invalidate(mm, 0, 1 << 64, event)
        for mirror in list(mm.mirrors):
            self.drop_mirror(mirror)
        self.drop_mm(mm)

    def start_invalidations(self, mm: Mm, changes: list[Change]) -> None:
        """Begin an invalidation per change now; their completion is awaited in the background."""
        by_event: dict[Event, list[tuple[int, int]]] = {}
        for start, end, event in changes:
            by_event.setdefault(event, []).append((start, end))
        for event, ranges in by_event.items():
            self.invalidator.begin(mm, ranges, event)

    async def _watch(self, mm: Mm) -> None:
        """Run the proc watcher; if it fails, EVICT the mirrors it can no longer protect."""
        try:
            await self._poll(mm)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("watcher of pid %d failed; evicting its mirrors", mm.pid)
            if not mm.released:
                mm.released = True
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(mm.pidfd)
                self.spawn(self._release(mm, Event.EVICT))

    async def _poll(self, mm: Mm) -> None:
        """The proc watcher's poll loop: adaptive, bounded by its own cost."""
        lo, hi = self.config.poll_min, self.config.poll_max
        interval = lo
        while not mm.released:
            await asyncio.sleep(interval)
            t0 = time.perf_counter()
            try:
                changes = detect(mm, self.zero_pfn)
            except ProcessLookupError:
                # Death is the pidfd's to report; an execve leaves no pidfd event behind.
                if mm.view.replaced():
                    self._on_exit(mm)
                return
            if changes:
                self.start_invalidations(mm, changes)
            self.cover_with_uffd(mm)  # new VMAs under a mirror raise no event: register them
            if mm.view.replaced():
                self._on_exit(mm)  # execve (or death): the mm we watch is gone, RELEASE it
                return
            cost = time.perf_counter() - t0
            # Poll fast after a change, back off while quiet, never spend >5% of a core.
            interval = lo if changes else min(hi, interval * 1.5)
            interval = max(interval, cost * 20)

    def mirror_of(self, session: Session, mirror_id: int) -> Mirror:
        """The live mirror ``mirror_id`` of ``session``, or NO_MIRROR."""
        mirror = session.mirrors.get(mirror_id)
        if mirror is None or mirror.dead:
            raise RequestError(
                ErrorCode.NO_MIRROR, f"session {session.id} has no mirror {mirror_id}"
            )
        if mirror.mm.released:
            raise RequestError(
                ErrorCode.ESRCH, f"process {mirror.mm.pid} of mirror {mirror_id} exited"
            )
        return mirror

    def status(self) -> dict[str, int | float | str]:
        """The figures ``hmmctl status`` shows."""
        p50, p99, p999 = self.invalidator.latency.percentiles(50, 99, 99.9)
        stats: dict[str, int | float | str] = {
            "epoch": self.epoch,
            "endpoint": self.transport.endpoint,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "sessions": sum(1 for s in self.sessions.values() if not s.fenced),
            "mms": len(self.mms),
            "mirrors": len(self.mirrors),
            "invalidations": self.invalidator.count,
            "stale": self.dma.stale,
            "ack_p50_us": round(p50, 1),
            "ack_p99_us": round(p99, 1),
            "ack_p999_us": round(p999, 1),
            "ack_samples": self.invalidator.latency.recorded,
            "last_acked_monotonic": round(self.invalidator.last_acked, 6),
            "uffd_watched": sum(1 for mm in self.mms.values() if mm.uffd and not mm.uffd.closed),
            "uffd_events": sum(
                sum(w.events.values())
                for mm in self.mms.values()
                for w in (mm.uffd, mm.strict_uffd)
                if w is not None
            ),
            "strict_write_faults": sum(
                mm.strict_uffd.events["write_fault"] for mm in self.mms.values() if mm.strict_uffd
            ),
            "written_runs": sum(mm.uffd.written_runs for mm in self.mms.values() if mm.uffd),
            "uffd_refusals": self.uffd_refusals,
            "reply_bytes": self.budget.total(),
            "reply_refusals": self.budget.refusals,
            "metrics": self.metrics.url,
            "uffd_last_refusal": self.uffd_last_refusal[:256],
        }
        stats.update(self.counters)
        stats.update(self.copier.figures())
        return stats
