"""hmmd's authorization, applied: the policy's decisions on sessions and requests.

``policy`` decides over plain data; this module reads /proc for it, turns a
refusal into ``PERMISSION_DENIED`` with the decision's one line, logs refusals
(rate-limited, so a flood of them cannot flood the journal) and counts them,
and says what ``status`` and ``inventory`` show to whom.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, NoReturn, Protocol

from hmmirror.daemon import logfmt
from hmmirror.daemon.config import Config
from hmmirror.daemon.errors import RequestError
from hmmirror.daemon.linux.creds import (
    Creds,
    CredsUnreadable,
    TooManyThreads,
    own_userns,
    read_agent_creds,
    read_creds,
    read_identity,
    yama_scope,
)
from hmmirror.daemon.linux.procfs import start_time
from hmmirror.daemon.policy import Agent, Host, Policy, own_process, refusal
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import FRAMES_PHYSICAL, Access
from hmmirror.transport.peer import Peer

if TYPE_CHECKING:
    from hmmirror.daemon.state import Mm, Session

log = logging.getLogger(__name__)


class DaemonView(Protocol):
    """What authorization reads of hmmd (``dispatch.Dispatcher`` is it): the policy and
    config in force, the counters refusals go to, and the status figures to filter."""

    policy: Policy | None
    config: Config
    counters: dict[str, int]

    def status(self) -> dict[str, int | float | str]:
        """Every status figure."""
        ...


#: ``status`` keys everyone sees: counters and figures, nothing naming a process, a path
#: or an address (the daemon's counters are added to these). Root and inspectors see all.
PUBLIC_STATUS = frozenset(
    {
        "epoch", "uptime_s", "sessions", "mms", "mirrors", "invalidations", "stale",
        "ack_p50_us", "ack_p99_us", "ack_p999_us", "ack_samples", "ack_histogram", "uffd_watched",
        "uffd_events", "strict_write_faults", "written_runs", "uffd_refusals",
        "reply_bytes", "reply_refusals", "copy_threads", "copy_stuck", "copy_timeouts",
        "copy_refused", "watch_lag_s", "windows", "window_bytes", "windows_attached",
        "window_refusals", "window_reads", "window_writes",
    }
)  # fmt: skip


_refusals = logfmt.Limited(log, "refusals")


#: How long a reading of Yama's ptrace_scope is reused, in seconds.
YAMA_REREAD = 1.0
_yama: list[float] = [-YAMA_REREAD, 0]


def host() -> Host:
    """hmmd's side of a decision, now (Yama's scope may change: reread every second)."""
    now = time.monotonic()
    if now - _yama[0] >= YAMA_REREAD:
        _yama[:] = [now, yama_scope()]
    return Host(hmmd_pid=os.getpid(), userns=own_userns(), yama=int(_yama[1]))


def may_inspect(d: DaemonView, peer: Peer) -> bool:
    """Root over ipc, or an agent with an ``inspect`` grant, sees every session."""
    return peer.root or (d.policy is not None and d.policy.inspector(peer.identity))


def vouch(peer: Peer, pidfd: int) -> Creds | None:
    """When a local agent knocks: its process's credentials, read through the pidfd of the
    connection when the kernel gave one (so no reused pid can stand in for it)."""
    if peer.local and peer.pid and peer.uid is not None and peer.gid is not None:
        return read_agent_creds(peer.pid, peer.uid, peer.gid, pidfd if pidfd >= 0 else None)
    return None


def open_session(d: DaemonView, session: Session, vouched: Creds | None) -> None:
    """At HELLO: the agent's credentials (``vouched``, read when it connected); the
    session's rights."""
    peer = session.peer
    session.credentials = vouched
    session.inspector = may_inspect(d, peer)
    # Root over ipc could read the PFNs from pagemap itself (unless root_frames says
    # tokens for everyone); anyone else needs a frames = "physical" grant.
    session.physical_frames = (peer.root and d.config.root_frames == FRAMES_PHYSICAL) or (
        d.policy is not None and d.policy.physical_frames(peer.identity)
    )


def refuse(d: DaemonView, who: str, what: str, why: str) -> NoReturn:
    """Count, log (rate-limited) and raise PERMISSION_DENIED with the one-line reason."""
    d.counters["refusals"] = d.counters.get("refusals", 0) + 1
    _refusals.warning("refused %s by %s: %s", what, who, why)
    raise RequestError(ErrorCode.PERMISSION_DENIED, why)


def _who(session: Session) -> str:
    """How logs name a session."""
    return f"session {session.id} ({session.name}, {session.peer.identity})"


def authorize(d: DaemonView, session: Session, pid: int, access: Access, what: str) -> Creds:
    """The target's credentials if ``session`` may have ``access`` to ``pid``; else
    PERMISSION_DENIED (ESRCH for a process that does not exist)."""
    agent, now = Agent(session.peer, session.credentials), host()
    try:
        # A privileged agent may have any process but hmmd: who it is is all that matters
        # (and saves the per-thread reads on the target's own sync_range path).
        if agent.privileged(now):
            target = read_identity(pid)
        else:
            target = read_creds(pid, ancestry=now.yama == 1)
    except CredsUnreadable as exc:
        raise RequestError(ErrorCode.ESRCH, str(exc.args[-1])) from exc
    except TooManyThreads as exc:
        refuse(d, _who(session), what, str(exc))
    why = refusal(d.policy, agent, target, access, now)
    if why is not None:
        refuse(d, _who(session), what, why)
    return target


def authorize_sync_range(d: DaemonView, session: Session, pid: int, watched: bool) -> None:
    """``sync_range`` needs write access to ``pid``. Its hot callers are answered without
    reading the target's credentials: a target announcing its own change, from its start time
    alone (the kernel's same-thread-group rule), and a privileged agent (root, or
    CAP_SYS_PTRACE) naming a process hmmd ``watched``, which is never hmmd itself: ``refusal``
    would read who the target is only to refuse hmmd's own pid, or any pid under Yama 3."""
    agent, now = Agent(session.peer, session.credentials), host()
    if watched and now.yama < 3 and agent.privileged(now):
        return
    try:
        if own_process(agent, pid, start_time(pid)):
            return
    except ProcessLookupError as exc:
        raise RequestError(ErrorCode.ESRCH, f"no process {pid}") from exc
    authorize(d, session, pid, Access.READ | Access.WRITE, "sync_range")


def authorize_attached(
    d: DaemonView, session: Session, mm: Mm, checked: Creds, access: Access, what: str
) -> None:
    """Once ``mm`` is open: it must be the process ``checked`` was, and still allowed.

    An execve between the first check and opening the mm (a set-uid program, say)
    would otherwise hand the agent the new image: the mm pins what was current when
    it was opened, and the credentials read after that are the ones that apply to it.
    """
    if mm.start_time != checked.start:
        raise RequestError(ErrorCode.ESRCH, f"process {mm.pid} was replaced (pid reused)")
    now = authorize(d, session, mm.pid, access, what)
    if now.start != checked.start:
        raise RequestError(ErrorCode.ESRCH, f"process {mm.pid} was replaced (pid reused)")


def visible_status(d: DaemonView, peer: Peer) -> dict[str, int | float | str]:
    """``status`` for ``peer``: everything for root and inspectors, else counters only."""
    stats = d.status()
    if may_inspect(d, peer):
        return stats
    return {k: v for k, v in stats.items() if k in PUBLIC_STATUS or k in d.counters}
