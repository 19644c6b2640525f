"""/proc readers for authorization: a process's credentials, as the kernel's ptrace check sees them.

Sources, on this kernel (6.x) and every one since 4.x:

- ``/proc/PID/task/TID/status``: ``Uid:``/``Gid:`` (real, effective, saved, fs),
  ``CapPrm:``/``CapEff:``; every thread, because credentials are per thread while
  the memory hmmd mirrors is shared by all of them.
- Dumpable: not shown anywhere in /proc, but ``task_dump_owner()`` (fs/proc/base.c)
  makes a non-dumpable task's files owned by root (of the mm's user namespace)
  instead of by its effective uid/gid. It skips that step for the ``/proc/PID``
  directory itself (mode 0555), so the owner is read from ``.../status``, a file.
  A process whose effective uid is 0, or that lives in another user namespace,
  cannot be told apart this way: it counts as not dumpable.
- ``/proc/PID/ns/user``: the user namespace, compared by inode.
- ``/proc/PID/stat`` field 4: the parent, for Yama's descendant rule.
- ``/proc/sys/kernel/yama/ptrace_scope``: absent without Yama (scope 0).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import select
import struct
from dataclasses import dataclass, replace

from hmmirror.daemon.linux.procfs import start_time

#: The capability that lets a tracer pass every ptrace check (linux/capability.h).
CAP_SYS_PTRACE = 19
#: A process with more threads is not checked thread by thread: it is refused.
MAX_THREADS = 16384
#: At most this many parents are walked up for Yama's descendant rule.
MAX_ANCESTORS = 4096
YAMA_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"


class CredsUnreadable(ProcessLookupError):
    """A process's credentials could not be read: it is gone, or changed while read."""


class TooManyThreads(PermissionError):
    """A process has more threads than hmmd checks (:data:`MAX_THREADS`)."""


@dataclass(frozen=True)
class Creds:
    """A process's credentials: plain data the policy decides on."""

    pid: int
    """The thread-group id (the pid a tid belongs to)."""
    start: int
    """Its start time (clock ticks since boot): with ``pid``, who it is."""
    uids: frozenset[int]
    """Every real, effective, saved and fs uid of every thread."""
    gids: frozenset[int]
    """Every real, effective, saved and fs gid of every thread."""
    cap_prm: int = 0
    """The union of the threads' permitted capability sets."""
    cap_eff: int = 0
    """The union of the threads' effective capability sets."""
    dumpable: bool = False
    """Provably dumpable: every thread's /proc files are owned by its effective ids."""
    userns: int = 0
    """The inode of its user namespace."""
    exe: str = ""
    cgroup: str = ""
    ancestors: tuple[int, ...] = ()
    """Its parent, grandparent, ... up to pid 1 (read only when Yama needs it)."""

    def describe(self) -> str:
        """``uids 1000/0, gids 1000, not dumpable``: for refusal messages."""
        uids = "/".join(str(u) for u in sorted(self.uids))
        gids = "/".join(str(g) for g in sorted(self.gids))
        caps = f", capabilities {self.cap_prm:#x}" if self.cap_prm else ""
        dumpable = "" if self.dumpable else ", not dumpable"
        return f"uids {uids}, gids {gids}{caps}{dumpable}"


@functools.cache
def own_userns() -> int:
    """The inode of hmmd's own user namespace (it never changes: read once)."""
    return os.stat("/proc/self/ns/user").st_ino


_TGID = re.compile(rb"\nTgid:\t(\d+)\n")
_IDS = re.compile(rb"\nUid:\t(\d+)\t(\d+)\t(\d+)\t(\d+)\nGid:\t(\d+)\t(\d+)\t(\d+)\t(\d+)\n")
_CAPS = re.compile(rb"\nCapPrm:\t([0-9a-f]+)\nCapEff:\t([0-9a-f]+)\n")


def _status(path: str) -> tuple[bytes, os.stat_result] | None:
    """A status file's text and owner; None if its task exited meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        return os.read(fd, 1 << 16), os.fstat(fd)
    except ProcessLookupError:
        return None
    finally:
        os.close(fd)


def _thread(path: str) -> tuple[tuple[int, ...], int, int, bool] | None:
    """One thread's (uids then gids, CapPrm, CapEff, owned by its effective ids); None if it
    exited meanwhile."""
    got = _status(path)
    if got is None:
        return None
    text, owner = got
    ids, caps = _IDS.search(text), _CAPS.search(text)
    if ids is None or caps is None:
        return None  # a zombie thread shows no credentials worth reading
    numbers = tuple(int(x) for x in ids.groups())
    euid, egid = numbers[1], numbers[5]
    # task_dump_owner: a non-dumpable task's files belong to (its namespace's) root.
    owned = (owner.st_uid, owner.st_gid) == (euid, egid) and euid != 0
    return numbers, int(caps[1], 16), int(caps[2], 16), owned


def _tgid(pid: int) -> int:
    """The thread group ``pid`` belongs to (ProcessLookupError if none)."""
    got = _status(f"/proc/{pid}/status")
    match = _TGID.search(got[0]) if got is not None else None
    if match is None:
        raise ProcessLookupError(pid, f"no process {pid}")
    return int(match[1])


def read_identity(pid: int) -> Creds:
    """Only who ``pid`` is (its thread group and start time), no credentials: all a decision
    about a privileged agent needs. Raises :class:`CredsUnreadable`."""
    try:
        before = start_time(pid)
        tgid = _tgid(pid)
        if start_time(pid) != before:
            raise CredsUnreadable(pid, f"process {pid} changed while it was read")
    except OSError as exc:
        if isinstance(exc, CredsUnreadable):
            raise
        raise CredsUnreadable(pid, f"no process {pid}") from exc
    return Creds(tgid, before, frozenset(), frozenset())


def read_creds(pid: int, *, ancestry: bool = False) -> Creds:
    """The credentials of the process ``pid`` (or of the process thread ``pid`` belongs to).

    Raises :class:`CredsUnreadable` when it does not exist or changed identity while
    being read (its start time moved: the pid was reused), :class:`TooManyThreads`.
    """
    try:
        before = start_time(pid)
        base = f"/proc/{_tgid(pid)}"
        userns = os.stat(f"{base}/ns/user").st_ino
        tids = os.listdir(f"{base}/task")
        if len(tids) > MAX_THREADS:
            raise TooManyThreads(f"process {pid} has {len(tids)} threads; hmmd checks the "
                                 f"credentials of at most {MAX_THREADS}")  # fmt: skip
        ids: set[tuple[int, ...]] = set()
        prm = eff = 0
        dumpable = userns == own_userns()  # else its root may map to its own uid: unprovable
        for tid in tids:
            got = _thread(f"{base}/task/{tid}/status")
            if got is None:
                continue
            ids.add(got[0])
            prm |= got[1]
            eff |= got[2]
            dumpable = dumpable and got[3]
        exe = ""
        with contextlib.suppress(OSError):
            exe = os.readlink(f"{base}/exe")
        with open(f"{base}/cgroup") as f:
            cgroup = f.read().strip().rpartition(":")[2]
        tgid = int(base[6:])
        parents = ancestors(tgid) if ancestry else ()
        if not ids or start_time(pid) != before:
            raise CredsUnreadable(pid, f"process {pid} changed while its credentials were read")
    except (OSError, ValueError) as exc:
        if isinstance(exc, CredsUnreadable | TooManyThreads):
            raise
        raise CredsUnreadable(pid, f"cannot read the credentials of process {pid}: {exc}") from exc
    uids = frozenset(u for t in ids for u in t[:4])
    gids = frozenset(g for t in ids for g in t[4:])
    return Creds(tgid, before, uids, gids, prm, eff, dumpable, userns, exe, cgroup, parents)


def _readable(fd: int) -> bool:
    """Whether ``fd`` polls readable now: poll(2), since select(2) refuses fds above 1023."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def sender_start_time(pid: int, pidfd: int) -> int:
    """The start time of the process that knocked at a door as ``pid``, with the door's
    pidfd of it (SO_PEERPIDFD); ProcessLookupError once that process has exited.

    SO_PEERCRED's pid is the connecting process's, recorded at connect(): if that process
    exited before its knock is read, the pid may be another process's by now, of any
    user. The pidfd names the connecting process itself and polls readable once it has
    exited, so a start time read while it still does not belongs to that process, not to
    a successor. Without a pidfd (-1: a kernel before 6.5) only the pid's word counts.
    """
    started = start_time(pid)
    if pidfd >= 0 and _readable(pidfd):
        raise ProcessLookupError(pid, f"process {pid} is gone")
    return started


def read_agent_creds(pid: int, uid: int, gid: int, pidfd: int | None = None) -> Creds | None:
    """The credentials of an ``ipc://`` agent's process, read at HELLO; None if unproven.

    ``uid``/``gid`` come from SO_PEERCRED; the process now at ``pid`` must still
    have them as its effective ids, and it must stay alive while it is read (a
    pidfd pins it, so the pid cannot be reused under us). A pid reused between
    connect() and here by another process of the same user would lend it its
    capabilities: a ``pidfd`` from SO_PEERPIDFD (Linux 6.5), when the transport
    has one, closes that gap.
    """
    own = pidfd is None
    try:
        if pidfd is None:
            pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        creds = read_creds(pid)
        # Read only where it can matter (most agents hold no capability), while alive.
        secure = bool(creds.cap_prm or creds.cap_eff) and _secure_exec(pid)
        alive = not _readable(pidfd)  # a pidfd is readable once its process exited
    except OSError:
        return None
    finally:
        if own:
            os.close(pidfd)
    if not alive or creds.pid != pid or creds.uids != {uid} or creds.gids != {gid}:
        return None  # gone, a thread, or set-id (mixed ids): only SO_PEERCRED's word counts
    if secure:
        # Capabilities its program gained at exec (file capabilities): the process may have
        # exec'd it after connecting, and whoever holds the connection would borrow them.
        return replace(creds, cap_prm=0, cap_eff=0)
    return creds


#: ``AT_SECURE`` (include/uapi/linux/auxvec.h): set when the program running gained
#: privileges at exec (set-uid, set-gid, or file capabilities), as the dynamic loader sees.
AT_SECURE = 23
_AUXV_ENTRY = struct.Struct("@LL")


def _secure_exec(pid: int) -> bool:
    """Whether the program ``pid`` runs gained privileges when it was exec'd (its auxv's
    AT_SECURE; ambient capabilities, as systemd's AmbientCapabilities= gives, do not)."""
    with open(f"/proc/{pid}/auxv", "rb") as f:
        data = f.read()
    for key, value in _AUXV_ENTRY.iter_unpack(data[: len(data) - len(data) % _AUXV_ENTRY.size]):
        if key == AT_SECURE:
            return bool(value)
    return True  # no AT_SECURE: nothing says the capabilities were not gained at exec


def ancestors(pid: int) -> tuple[int, ...]:
    """``pid``'s parent, its parent, ... up to (and with) pid 1; bounded."""
    chain: list[int] = []
    current = pid
    for _ in range(MAX_ANCESTORS):
        try:
            with open(f"/proc/{current}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            break
        parent = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if parent <= 0:
            break
        chain.append(parent)
        current = parent
    return tuple(chain)


def yama_scope() -> int:
    """Yama's ``ptrace_scope``: 0 when Yama is absent, 2 (admin only) when unreadable."""
    try:
        with open(YAMA_SCOPE) as f:
            return int(f.read().strip())
    except FileNotFoundError:
        return 0
    except (OSError, ValueError):
        return 2  # there, but unreadable: refuse what it might refuse
