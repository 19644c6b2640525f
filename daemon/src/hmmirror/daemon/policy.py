"""Authorization: which agent may mirror which process, as a decision over plain data.

**The floor is the kernel's own rule.** Without a policy file, and under every
policy, an agent may mirror (read and write) a process exactly when the kernel
would let it ``process_vm_readv`` that process (PTRACE_MODE_ATTACH_REALCREDS,
``__ptrace_may_access`` with commoncap and Yama):

- the agent is privileged: uid 0 over ``ipc://`` (SO_PEERCRED), or CAP_SYS_PTRACE in
  its effective set in hmmd's own user namespace, as the kernel's ``ptrace_has_cap``;
- or it is an ``ipc://`` agent and every real, effective, saved and fs uid and gid of
  every thread of the target equals the agent's own, the target is dumpable, lives in
  the agent's user namespace and holds no permitted capability the agent lacks;
- and Yama allows it: scope 1 wants the target to be the agent's process or a
  descendant of it, scope 2 a privileged agent, scope 3 nobody at all.

A ``tcp://`` agent gets nothing from this rule. Stricter than the kernel, on purpose:
a thread group's access to itself counts for ``sync_range`` only (``own_process``:
a SO_PEERCRED pid may have been reused before HELLO), a process with euid 0 or in
another user namespace counts as not dumpable (/proc cannot show it), and Yama's
PR_SET_PTRACER exceptions are not visible.

**Grants widen it.** A policy is a TOML file of grants::

    [[grant]]
    agents = ["curve:Z85PUBLICKEY...", "uid:1000"]   # or "any"
    uids = [1000]                                      # target ids (optional)
    gids = [1000]                                      # (optional)
    exes = ["/usr/bin/app"]                            # target executables (optional)
    cgroups = ["/system.slice/app.service"]            # target cgroup prefixes (optional)
    privileged = false                                 # see below
    access = ["read", "write"]                         # and/or "inspect"
    frames = "physical"                                # optional

A grant covers a target when it names the agent, every target criterion it sets
matches, and its access covers what is asked. ``uids``/``gids`` match *every* real,
effective, saved and fs id of every thread, never only the real uid. Without
``privileged = true`` a grant covers only targets that are dumpable and hold no
capabilities: set-id programs, processes that made themselves undumpable and root's
processes need it. ``inspect`` and ``frames = "physical"`` are rights of the session,
whatever the grant's target criteria: any grant naming the agent that has them gives
them. ``"any"`` names every agent, an ``insecure`` tcp:// one included. Grants are the
operator's explicit word: Yama's scopes 1 and 2 do not narrow them. Nothing covers
hmmd itself, and Yama's scope 3 stops everyone.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from typing import Any

from hmmirror.daemon.linux.creds import CAP_SYS_PTRACE, Creds
from hmmirror.proto.messages import Access
from hmmirror.transport.peer import Peer
from hmmirror.transport.settings import UntrustedFile, open_trusted

_ACCESS = {"read": Access.READ, "write": Access.WRITE}
_KEYS = {"agents", "uids", "gids", "exes", "cgroups", "privileged", "access", "frames"}
_AGENT = re.compile(r"^(any|uid:\d{1,10}|curve:[0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]{40})$")


class PolicyError(ValueError):
    """The policy file is malformed; the message names the grant and the key."""


@dataclass(frozen=True)
class Host:
    """What a decision needs to know about hmmd's side."""

    hmmd_pid: int
    userns: int
    """The inode of hmmd's user namespace."""
    yama: int = 0
    """Yama's ptrace_scope (0 without Yama)."""


@dataclass(frozen=True)
class Agent:
    """Who asks: what the transport proved, and its process's credentials (``ipc://``)."""

    peer: Peer
    creds: Creds | None = None
    """Read at HELLO; None for ``tcp://``, or when the process could not be proven."""

    def privileged(self, host: Host) -> bool:
        """uid 0 over ipc, or CAP_SYS_PTRACE in effect in hmmd's user namespace."""
        if self.peer.root:
            return True
        creds = self.creds
        return (
            creds is not None
            and creds.userns == host.userns
            and bool(creds.cap_eff & (1 << CAP_SYS_PTRACE))
        )


@dataclass(frozen=True)
class Grant:
    """One ``[[grant]]``: who, over which targets, with which access and session rights."""

    agents: frozenset[str]
    access: Access
    uids: frozenset[int] | None = None
    gids: frozenset[int] | None = None
    exes: frozenset[str] | None = None
    cgroups: tuple[str, ...] | None = None
    privileged: bool = False
    inspect: bool = False
    physical_frames: bool = False

    def names(self, agent: str) -> bool:
        """Whether this grant is for ``agent`` (``uid:N``, ``curve:KEY``, ``unknown``)."""
        return "any" in self.agents or agent in self.agents

    def covers(self, target: Creds, access: Access) -> bool:
        """Whether every target criterion matches and the access is granted."""
        if not access or access & ~self.access:
            return False
        if self.uids is not None and not target.uids <= self.uids:
            return False
        if self.gids is not None and not target.gids <= self.gids:
            return False
        if not self.privileged and (not target.dumpable or target.cap_prm):
            return False
        if self.exes is not None and target.exe not in self.exes:
            return False
        return self.cgroups is None or any(
            target.cgroup == c or target.cgroup.startswith(c.rstrip("/") + "/")
            for c in self.cgroups
        )


def _ints(raw: dict[str, Any], key: str, where: str) -> frozenset[int] | None:
    """An optional list of integer ids."""
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32 for v in value
    ):
        raise PolicyError(f"{where}: {key} must be a list of ids (integers)")
    return frozenset(value)


def _strings(raw: dict[str, Any], key: str, where: str) -> list[str] | None:
    """An optional list of strings."""
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{where}: {key} must be a list of non-empty strings")
    return value


def parse_grant(raw: Any, where: str) -> Grant:
    """One ``[[grant]]`` table, checked; PolicyError names what is wrong."""
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: a grant must be a table")
    unknown = set(raw) - _KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(unknown)}")
    agents = _strings(raw, "agents", where)
    if not agents or not all(_AGENT.match(a) for a in agents):
        raise PolicyError(f"{where}: agents must list 'curve:KEY', 'uid:N' or 'any'")
    if "access" not in raw:
        raise PolicyError(f"{where}: access is required (a list of read, write, inspect)")
    names = _strings(raw, "access", where) if raw["access"] else []
    access = Access(0)
    for name in names or []:
        if name not in (*_ACCESS, "inspect"):
            raise PolicyError(f"{where}: access {name!r} is not read, write or inspect")
        access |= _ACCESS.get(name, Access(0))
    if access & Access.WRITE and not access & Access.READ:
        raise PolicyError(f"{where}: write access needs read access too (a mirror reads)")
    privileged = raw.get("privileged", False)
    if not isinstance(privileged, bool):
        raise PolicyError(f"{where}: privileged must be true or false")
    frames = raw.get("frames", "tokens")
    if frames not in ("tokens", "physical"):
        raise PolicyError(f"{where}: frames must be 'tokens' or 'physical', got {frames!r}")
    exes = _strings(raw, "exes", where)
    cgroups = _strings(raw, "cgroups", where)
    return Grant(
        agents=frozenset(agents),
        uids=_ints(raw, "uids", where),
        gids=_ints(raw, "gids", where),
        exes=frozenset(exes) if exes is not None else None,
        cgroups=tuple(cgroups) if cgroups is not None else None,
        access=access,
        privileged=privileged,
        inspect="inspect" in (names or []),
        physical_frames=frames == "physical",
    )


class Policy:
    """The grants of one policy file."""

    def __init__(self, grants: list[Grant]) -> None:
        self.grants = grants

    @classmethod
    def load(cls, path: str) -> Policy:
        """Parse ``path``; raise PolicyError naming what is wrong."""
        try:
            with open_trusted(path) as f:  # grants: a file another user could write is refused
                data = tomllib.load(f)
        except UntrustedFile as exc:
            raise PolicyError(str(exc.strerror)) from exc
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"{path}: {exc}") from exc
        unknown = set(data) - {"grant"}
        if unknown:
            raise PolicyError(f"{path}: unknown tables {sorted(unknown)} (only [[grant]])")
        raw = data.get("grant", [])
        if not isinstance(raw, list):
            raise PolicyError(f"{path}: grants are [[grant]] tables")
        return cls([parse_grant(g, f"{path}: grant {i + 1}") for i, g in enumerate(raw)])

    def covers(self, agent: str, target: Creds, access: Access) -> bool:
        """Whether a grant lets ``agent`` have ``access`` to ``target``."""
        return any(g.names(agent) and g.covers(target, access) for g in self.grants)

    def inspector(self, agent: str) -> bool:
        """Whether a grant gives ``agent`` the ``inspect`` right."""
        return any(g.inspect and g.names(agent) for g in self.grants)

    def physical_frames(self, agent: str) -> bool:
        """Whether a grant gives ``agent`` real frame numbers (``frames = "physical"``)."""
        return any(g.physical_frames and g.names(agent) for g in self.grants)


def own_process(agent: Agent, pid: int, start: int) -> bool:
    """Whether ``pid`` (started at ``start``) is the agent's own process, the one whose
    credentials hmmd read at HELLO: the kernel lets a thread group access itself whatever
    else holds. hmmd applies this to ``sync_range`` only (a target's own sync call), so a
    pid reused before HELLO can at most invalidate, never read or write."""
    creds = agent.creds
    return creds is not None and creds.pid == pid == agent.peer.pid and creds.start == start


def yama_refusal(agent: Agent, target: Creds, host: Host) -> str | None:
    """Why Yama's ``ptrace_scope`` forbids this attach, or None (``yama_ptrace_access_check``)."""
    if host.yama >= 3:
        return "Yama ptrace_scope 3 forbids every attach"
    if host.yama <= 0 or agent.privileged(host):
        return None
    if host.yama == 2:
        return "Yama ptrace_scope 2 lets only agents with CAP_SYS_PTRACE attach"
    if agent.peer.pid is None or agent.peer.pid not in (target.pid, *target.ancestors):
        return "Yama ptrace_scope 1: it is not a descendant of the agent's process"
    return None


def kernel_refusal(agent: Agent, target: Creds, host: Host) -> str | None:
    """Why the kernel's ptrace rule forbids ``agent`` this target, or None if it allows it."""
    if not agent.peer.local:
        return "a tcp:// agent gets only what a grant gives it"
    yama = yama_refusal(agent, target, host)
    if yama is not None or agent.privileged(host):
        return yama
    mine = agent.creds
    if mine is None:
        return "its process's credentials could not be proven at hello"
    if target.uids != mine.uids or target.gids != mine.gids:
        return "its ids are not all the agent's"
    if target.userns != mine.userns:
        return "it lives in another user namespace"
    if not target.dumpable:
        return "it is not dumpable"
    if target.cap_prm & ~mine.cap_prm:
        return "it holds capabilities the agent lacks"
    return None


def refusal(
    policy: Policy | None, agent: Agent, target: Creds, access: Access, host: Host
) -> str | None:
    """Why ``agent`` may not have ``access`` to ``target``: one line, or None if it may."""
    if target.pid == host.hmmd_pid:
        return f"pid {target.pid} is hmmd itself: nobody may mirror it"
    if host.yama >= 3:
        return "Yama ptrace_scope 3 forbids every attach, hmmd's own included"
    why = kernel_refusal(agent, target, host)
    if why is None or (policy is not None and policy.covers(agent.peer.identity, target, access)):
        return None
    verb = "write" if access & Access.WRITE else "read"
    grants = "no grant covers it" if policy is not None else "no policy file grants more"
    return (
        f"{agent.peer.identity} may not {verb} pid {target.pid} ({target.describe()}): "
        f"{why}, and {grants}"
    )
