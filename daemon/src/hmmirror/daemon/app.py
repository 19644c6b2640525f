"""The hmmd application: wires the parts of one hmmd together, runs it, reports its status.

The parts, each importing only those below it (docs/ARCHITECTURE.md §1.1):
the transport's ``Server`` delivers each message to ``dispatch.Dispatcher``,
which decodes it and calls its handler (``handlers``, ``fault.handlers``,
``dma.handlers``) with a ``request.Request`` and the dispatcher as the
handlers' ``request.Services``. Handlers read and change the ``registry``
(sessions, mms, mirrors), start watching through ``watch.supervisor``, and
answer through ``outbox.Courier``, the only writer of a session's messages.
The watchers (``watch.proc``, ``watch.uffd``, their uffds obtained by
``watch.acquire``) announce changes to ``invalidation.Invalidator``, the
fan-out, which queues INVALIDATEs in each session's outbox and counts the acks.
``sessions`` evicts, closes and sweeps sessions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from hmmirror.daemon import authz, histogram
from hmmirror.daemon.config import Config
from hmmirror.daemon.dispatch import Dispatcher
from hmmirror.daemon.dma.copier import Copier
from hmmirror.daemon.dma.service import DmaService
from hmmirror.daemon.dma.window import Windows
from hmmirror.daemon.fault.heap import keep_freed_memory
from hmmirror.daemon.invalidation import Invalidation, Invalidator
from hmmirror.daemon.limits import FdBudget, MirrorCaps
from hmmirror.daemon.linux import injector
from hmmirror.daemon.linux.procfs import zero_pfn
from hmmirror.daemon.metrics import MetricsServer
from hmmirror.daemon.outbox import Courier
from hmmirror.daemon.owners import Owners, OwnersMissing
from hmmirror.daemon.policy import Policy, PolicyError
from hmmirror.daemon.registry import Registry
from hmmirror.daemon.sessions import Sessions
from hmmirror.daemon.state import Session
from hmmirror.daemon.watch.acquire import Acquirer
from hmmirror.daemon.watch.supervisor import Supervisor
from hmmirror.proto.codec import Buffer
from hmmirror.transport import AllowDir, Connection, Peer, Server, ServerKeys
from hmmirror.transport.budget import ReplyBudget

log = logging.getLogger(__name__)

#: The counters ``status`` reports, all zero at the start.
COUNTERS = (
    "messages", "bad_messages", "faults", "dma_reads", "dma_writes", "dma_atomics",
    "evictions", "releases", "registrations", "reply_evictions", "refusals", "moved",
    "mirror_refusals",
)  # fmt: skip


class Daemon:
    """One hmmd instance: builds the parts, serves until stopped, and reports status."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.epoch = secrets.token_hex(8)
        self.started = time.monotonic()
        self.zero_pfn = zero_pfn()
        keep_freed_memory()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.fds = FdBudget.raise_limit(config)
        tcp = config.endpoint.startswith("tcp://")
        self.allow = AllowDir(config.curve_allow) if tcp and config.curve_key else None
        self.windows = Windows(enabled=not tcp)
        door = {"uffd": self._on_uffd} if config.uffd != "off" else {}
        door["window"] = self.windows.on_door
        self.transport = Server(
            config.endpoint,
            self._on_message,
            keys=ServerKeys.load(config.curve_key) if tcp and config.curve_key else None,
            allow=self.allow,
            insecure=config.insecure,
            group=config.socket_group,
            limits=self.fds.connection_limits,
            heartbeat_ms=config.heartbeat_ms,
            door_handlers=door,
            vouch=authz.vouch,
        )
        if tcp and not config.curve_key:
            log.warning(
                "%s is plain TCP (insecure = true): anyone who can reach it can mirror, "
                "and can disturb hmmd's other connections",
                self.transport.endpoint,
            )
        self.copier = Copier(config.copy_deadline)
        if config.copy_deadline > config.ack_deadline:
            log.warning(
                "copy_deadline %g s exceeds ack_deadline %g s: an agent whose DMA is blocked in "
                "a target is evicted for its held ACKs before it is answered EBUSY",
                config.copy_deadline,
                config.ack_deadline,
            )
        # Built bottom-up; a lower part calls up only through what it was handed here.
        self.registry = Registry(on_close=self.copier.forget, caps=MirrorCaps.of(config))
        budget = ReplyBudget(config.reply_cap, config.ack_deadline)
        self.courier: Courier[Invalidation] = Courier(self.transport, budget, self._evict)
        self.invalidator = Invalidator(
            self.courier, config.ack_deadline, self._evict, self.registry.on_mm_idle
        )
        self.sessions = Sessions(
            self.registry, self.invalidator, self.courier, self.transport, self.counters,
            self.windows.end,
        )  # fmt: skip
        self.dma = DmaService(self.zero_pfn, self.invalidator, self.copier)
        self.acquirer = Acquirer(
            self.registry, self.invalidator, self.spawn, self.zero_pfn,
            config.uffd, config.uffd_fork, self.fds.offers,
        )  # fmt: skip
        self.supervisor = Supervisor(
            self.registry, self.invalidator, self.acquirer, self.spawn, self.zero_pfn,
            (config.poll_min, config.poll_max), lambda: (self.fds.mms, self.fds.nofile),
            self.counters,
        )  # fmt: skip
        self.dispatch = Dispatcher(
            config, self.epoch, self.zero_pfn, self.counters, self.registry, self.courier,
            self.invalidator, self.sessions, self.supervisor, self.acquirer, self.dma,
            self.copier, self.windows, self.status, self.spawn,
        )  # fmt: skip
        self.stopping = asyncio.Event()
        self.metrics = MetricsServer(self.status, self.invalidator.latency)

    def _claim_in(self, config: Config) -> None:
        """Open the owners directory (SPEC §1.7). A default one that cannot be made (a
        tcp:// hmmd run by a user without /run/hmmirror) leaves this hmmd claiming nothing,
        as before there were claims, and says so; one configured, or one that others could
        write, stops hmmd (``OwnersError``)."""
        path = config.owners_path
        if path is None:
            return
        try:
            self.registry.owners = Owners(path, self.transport.endpoint)
        except OwnersMissing as exc:
            if config.owners_dir:
                raise
            log.warning(
                "%s: this hmmd claims no process, so no other hmmd of the host may watch "
                "the processes it watches (set owners_dir, or run one hmmd)",
                exc,
            )
            return
        swept = self.registry.owners.sweep()
        log.info("claims in %s (%d left by instances gone, removed)", path, swept)

    def _on_message(self, conn: Connection, frames: Sequence[Buffer]) -> None:
        """The transport's delivery of one inbound message."""
        self.dispatch.on_message(conn, frames)

    def _on_uffd(self, peer: Peer, arg: str, fd: int, pidfd: int) -> str | None:
        """Door line ``uffd``: a target hands hmmd a userfaultfd (``watch.acquire``)."""
        return self.acquirer.on_door(peer, arg, fd, pidfd)

    def _evict(self, session: Session, reason: str) -> None:
        """Evict ``session`` (for the outbox and the fan-out, built before ``sessions``)."""
        self.sessions.evict(session, reason)

    # --- lifecycle ---------------------------------------------------------------------------

    async def serve(self, ready: Callable[[str], None] | None = None) -> None:
        """Run until ``stop()``: drain the socket, sweep leases.

        Raises AddressInUse (another hmmd answers at the endpoint) or OSError before it
        is ready, with everything it opened closed again.
        """
        config = self.config
        sweeper: asyncio.Task[Any] | None = None
        try:
            self.transport.start()
            self.acquirer.open_intake(config, self.transport.ipc)
            self._claim_in(config)
            if config.metrics:
                await self.metrics.start(config.metrics)
                log.info("metrics on %s", self.metrics.url)
            if ready is not None:
                ready(self.transport.endpoint)
            sweep = self.sessions.sweep(
                config.lease, config.ack_deadline, config.heartbeat_ms / 1000, self.acquirer.expire
            )
            sweeper = self.spawn(sweep)
            await self.stopping.wait()
            log.info("shutting down: %d mirrored processes", len(self.registry.mms))
        finally:
            if sweeper is not None:
                sweeper.cancel()
            for task in list(self._tasks):
                task.cancel()
            self.registry.close()
            self.copier.close()
            self.windows.close()
            self.metrics.close()
            self.acquirer.close()
            if self.registry.owners is not None:
                self.registry.owners.close()
                self.registry.owners = None  # its directory descriptor is closed
            self.transport.close()
            injector.INJECTORS.close()

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
        self.dispatch.policy = policy
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

    # --- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, int | float | str]:
        """The figures ``hmmctl status`` shows."""
        inv, reg, budget = self.invalidator, self.registry, self.courier.budget
        mms = list(reg.mms.values())
        p50, p99, p999 = inv.latency.percentiles(50, 99, 99.9)
        stats: dict[str, int | float | str] = {
            "epoch": self.epoch,
            "endpoint": self.transport.endpoint,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "sessions": sum(1 for s in reg.sessions.values() if not s.fenced),
            "mms": len(mms),
            "mirrors": len(reg.mirrors),
            "invalidations": inv.count,
            "stale": self.dma.stale,
            "ack_p50_us": round(p50, 1),
            "ack_p99_us": round(p99, 1),
            "ack_p999_us": round(p999, 1),
            "ack_samples": inv.latency.recorded,
            "ack_histogram": histogram.status_text(inv.latency),
            "last_acked_monotonic": round(inv.last_acked, 6),
            "uffd_watched": sum(1 for mm in mms if mm.uffd and not mm.uffd.closed),
            "uffd_events": sum(
                sum(w.events.values()) for mm in mms for w in (mm.uffd, mm.strict_uffd) if w
            ),
            "strict_write_faults": sum(
                mm.strict_uffd.events["write_fault"] for mm in mms if mm.strict_uffd
            ),
            "written_runs": sum(mm.uffd.written_runs for mm in mms if mm.uffd),
            "uffd_refusals": self.acquirer.refusals,
            "watch_lag_s": round(max((v for mm in mms for v in mm.lag.values()), default=0.0), 4),
            "reply_bytes": budget.total(),
            "reply_refusals": budget.refusals,
            "metrics": self.metrics.url,
            "uffd_last_refusal": self.acquirer.last_refusal[:256],
            "claims": len(reg.owners) if reg.owners is not None else 0,
        }
        stats.update(self.counters)
        stats.update(self.copier.figures())
        stats.update(self.windows.figures())
        return stats
