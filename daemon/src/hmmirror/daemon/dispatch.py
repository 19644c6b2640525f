"""Message dispatch: decode, gate and hand each inbound message to its handler.

Inbound messages arrive from the transport's ``Server`` with the ``Connection``
they came on (its routing id and the peer the kernel or CURVE proved). They are
decoded and validated by the proto codec, then dispatched through ``HANDLERS``
(``handlers``), an explicit table from message class to handler; a wire string
never reaches ``getattr``. Handlers that must wait (fault, sync_range) run as
tasks; the rest run inline. Every failure becomes a typed ``error`` reply and,
for malformed or out-of-order input, a count in ``bad_messages``; nothing a
peer sends can stop the loop.

The ``Dispatcher`` is also the ``request.Services`` the handlers are given: it
forwards each call to the part of hmmd that owns it, and every reply to the
outbox (``outbox.Courier``), the only writer of a session's messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from hmmirror.daemon.budget import busy
from hmmirror.daemon.config import Config
from hmmirror.daemon.dma.copier import Copier
from hmmirror.daemon.dma.service import DmaService
from hmmirror.daemon.dma.window import Windows
from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.frames import FrameTokens
from hmmirror.daemon.handlers import HANDLERS, UNGATED
from hmmirror.daemon.invalidation import Invalidation, Invalidator
from hmmirror.daemon.outbox import Courier
from hmmirror.daemon.owners import Moved
from hmmirror.daemon.policy import Policy
from hmmirror.daemon.registry import Registry
from hmmirror.daemon.request import Request
from hmmirror.daemon.sessions import Sessions
from hmmirror.daemon.state import Mm, Session, UffdWatcher
from hmmirror.daemon.trace import tracer
from hmmirror.daemon.watch.acquire import Acquirer
from hmmirror.daemon.watch.supervisor import Supervisor
from hmmirror.daemon.watch.uffd import device_write
from hmmirror.proto.codec import Buffer, Envelope, decode
from hmmirror.proto.errors import ErrorCode, ProtocolError
from hmmirror.proto.messages import Error, Message
from hmmirror.proto.version import MOVED_VERSION
from hmmirror.transport import Connection

log = logging.getLogger(__name__)


class Dispatcher:
    """Routes each inbound message to its handler, and serves the handlers."""

    def __init__(
        self,
        config: Config,
        epoch: str,
        zero_pfn: int,
        counters: dict[str, int],
        registry: Registry,
        courier: Courier[Invalidation],
        invalidator: Invalidator,
        sessions: Sessions,
        supervisor: Supervisor,
        acquirer: Acquirer,
        dma: DmaService,
        copier: Copier,
        windows: Windows,
        status: Callable[[], dict[str, int | float | str]],
        spawn: Callable[[Awaitable[Any]], asyncio.Task[Any]],
    ) -> None:
        self.config = config
        self.epoch = epoch
        self.zero_pfn = zero_pfn
        self.counters = counters
        #: This epoch's frame tokens: what agents without physical frames see as PFNs.
        self.frames = FrameTokens()
        self.registry = registry
        self.courier = courier
        self.budget = courier.budget
        self.invalidator = invalidator
        self.sessions = sessions
        self.supervisor = supervisor
        self.acquirer = acquirer
        self.dma = dma
        self.copier = copier
        self.windows = windows
        self._status = status
        self.spawn = spawn
        #: The policy in force (SIGHUP reads it again).
        self.policy = Policy.load(config.policy) if config.policy else None
        self._rejections_logged = 0

    # --- inbound ------------------------------------------------------------------------------

    def on_message(self, conn: Connection, frames: Sequence[Buffer]) -> None:
        """Decode, authorise by session state, and dispatch one inbound message."""
        self.counters["messages"] += 1
        identity = conn.rid
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
        session = self.registry.sessions.get(identity)
        if session is not None:
            session.last_seen = time.monotonic()
        if needs_session and (session is None or session.fenced):
            code = ErrorCode.NO_SESSION if session is None else ErrorCode.FENCED
            self.reject(
                identity, code, f"{env.type} needs a live session: send hello",
                env.id, env.type, bad=True,
            )  # fmt: skip
            return
        if handler not in UNGATED and self.budget.full(identity):
            refusal = busy(self.budget, identity, env.type)
            self.reject(identity, refusal.code, refusal.message, env.id, env.type, bad=False)
            return
        request = Request(identity, session, env, conn.peer, conn.vouched)
        try:
            result = handler(self, request)
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

    # --- answers ------------------------------------------------------------------------------

    def send(
        self,
        identity: bytes,
        msg: Message,
        re: int = 0,
        bulk: Sequence[Any] = (),
        copy: bool = True,
        reserved: int = 0,
    ) -> None:
        """Send ``msg`` to ``identity`` through the outbox, after any INVALIDATE queued for it."""
        session = self.registry.sessions.get(identity)
        self.courier.reply(identity, session, msg, re, bulk, copy, reserved)

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

    def answer_failure(self, identity: bytes, env: Envelope, exc: Exception) -> None:
        """Answer a handler's failure: its typed error, or INTERNAL (logged) for a bug."""
        if tracer.on:
            code = exc.code if isinstance(exc, RequestError) else ErrorCode.INTERNAL
            tracer.error(self.registry.sessions.get(identity), env.msg, env.id, int(code))
        if isinstance(exc, Moved):
            self._moved(identity, env, exc)
            return
        if isinstance(exc, RequestError):
            # Bad arguments are bad input, whether a cap or a range was violated; ESRCH,
            # NO_MIRROR or EPERM can follow from a race or a policy, not only from the peer.
            bad = exc.code in (ErrorCode.EINVAL, ErrorCode.TOO_LARGE)
            self.reject(identity, exc.code, exc.message, env.id, env.type, bad=bad)
            return
        log.error("%s id=%d from %r failed", env.type, env.id, identity, exc_info=exc)
        message = f"{env.type} failed: {exc}"
        self.reject(identity, ErrorCode.INTERNAL, message, env.id, env.type, bad=False)

    def _moved(self, identity: bytes, env: Envelope, exc: Moved) -> None:
        """Answer MOVED with the owner's endpoint; a session older than 1.3 does not know
        the code, and gets PERMISSION_DENIED with the endpoint in its message instead."""
        session = self.registry.sessions.get(identity)
        if session is not None and session.version >= MOVED_VERSION:
            error = Error(code=int(ErrorCode.MOVED), message=exc.message, owner=exc.owner)
        else:
            text = f"{exc.message} (protocol 1.3 agents are sent there)"
            error = Error(code=int(ErrorCode.PERMISSION_DENIED), message=text[:1024])
        self.counters["moved"] += 1
        self.send(identity, error, re=env.id)

    # --- the rest of request.Services -------------------------------------------------------

    def status(self) -> dict[str, int | float | str]:
        """Every status figure (``authz`` filters them per asker)."""
        return self._status()

    def close_session(self, session: Session) -> None:
        """Forget ``session``."""
        self.sessions.close(session)

    def attach_mm(self, pid: int, wanted_start: int) -> Mm:
        """The watched Mm of ``pid``."""
        return self.supervisor.attach(pid, wanted_start)

    def cover_with_uffd(self, mm: Mm) -> None:
        """Register ``mm``'s mirrored VMAs with its uffds."""
        self.supervisor.cover(mm)

    def track_writes(self, mm: Mm) -> None:
        """Arm written-page tracking for ``mm``."""
        self.supervisor.track_writes(mm)

    def strict_watch(self, mm: Mm) -> UffdWatcher | None:
        """``mm``'s strict-write watch, if it can have one."""
        return self.acquirer.strict_watch(mm)

    def device_write(self, mm: Mm, start: int, end: int) -> AbstractContextManager[None]:
        """Around hmmd's own write into the target: strict protection lifted."""
        return device_write(mm, start, end)
