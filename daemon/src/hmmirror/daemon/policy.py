"""Authorization: which agent may mirror which processes, for reading and/or writing.

A policy is a TOML file of grants::

    [[grant]]
    agents = ["curve:Z85PUBLICKEY...", "uid:1000"]   # or "any"
    uids = [1000]                                      # target owners (optional)
    exes = ["/usr/bin/app"]                            # target executables (optional)
    cgroups = ["/system.slice/app.service"]            # target cgroup prefixes (optional)
    access = ["read", "write"]

An agent is known by its CURVE public key on ``tcp://`` (the ZAP handler's
User-Id) and by its uid on ``ipc://`` (SO_PEERCRED, which ZeroMQ reports as
``Peer-Address``). A request is allowed when one grant names the agent, every
target criterion the grant sets matches, and the grant's access covers what
is asked. Without a policy file hmmd allows everything its socket lets in;
with one, everything else is PERMISSION_DENIED, and the reason is logged.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass

from hmmirror.proto.messages import Access

_ACCESS = {"read": Access.READ, "write": Access.WRITE}


class PolicyError(ValueError):
    """The policy file is malformed; the message names the grant and the key."""


@dataclass(frozen=True)
class Grant:
    """One ``[[grant]]``: who, over which targets, with which access."""

    agents: frozenset[str]
    uids: frozenset[int] | None
    exes: frozenset[str] | None
    cgroups: tuple[str, ...] | None
    access: Access


@dataclass(frozen=True)
class Target:
    """What the policy may ask of a target process."""

    uid: int
    exe: str
    cgroup: str

    @classmethod
    def of(cls, pid: int) -> Target:
        """Read the target's owner, executable and cgroup from /proc (ProcessLookupError)."""
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
            exe = os.path.realpath(f"/proc/{pid}/exe")
            with open(f"/proc/{pid}/cgroup") as f:
                cgroup = f.read().strip().rpartition(":")[2]
        except (OSError, StopIteration) as exc:
            raise ProcessLookupError(pid, f"cannot identify process {pid}: {exc}") from exc
        return cls(uid, exe, cgroup)


class Policy:
    """The grants of one policy file."""

    def __init__(self, grants: list[Grant]) -> None:
        self.grants = grants

    @classmethod
    def load(cls, path: str) -> Policy:
        """Parse ``path``; raise PolicyError naming what is wrong."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"{path}: {exc}") from exc
        grants = []
        for i, raw in enumerate(data.get("grant", [])):
            where = f"{path}: grant {i + 1}"
            unknown = set(raw) - {"agents", "uids", "exes", "cgroups", "access"}
            if unknown:
                raise PolicyError(f"{where}: unknown keys {sorted(unknown)}")
            agents = raw.get("agents")
            if not agents or not all(isinstance(a, str) for a in agents):
                raise PolicyError(f"{where}: agents must list 'curve:KEY', 'uid:N' or 'any'")
            access = Access(0)
            for name in raw.get("access", ["read"]):
                if name not in _ACCESS:
                    raise PolicyError(f"{where}: access {name!r} is not read or write")
                access |= _ACCESS[name]
            uids = raw.get("uids")
            if uids is not None and not all(isinstance(u, int) for u in uids):
                raise PolicyError(f"{where}: uids must be integers")
            grants.append(
                Grant(
                    frozenset(agents),
                    frozenset(uids) if uids is not None else None,
                    frozenset(raw["exes"]) if "exes" in raw else None,
                    tuple(raw["cgroups"]) if "cgroups" in raw else None,
                    access,
                )
            )
        return cls(grants)

    def refusal(self, agent: str, pid: int, access: Access) -> str | None:
        """Why ``agent`` may not have ``access`` to process ``pid``, or None if it may."""
        try:
            target = Target.of(pid)
        except ProcessLookupError as exc:
            return str(exc)
        for grant in self.grants:
            if "any" not in grant.agents and agent not in grant.agents:
                continue
            if grant.uids is not None and target.uid not in grant.uids:
                continue
            if grant.exes is not None and target.exe not in grant.exes:
                continue
            if grant.cgroups is not None and not any(
                target.cgroup == c or target.cgroup.startswith(c.rstrip("/") + "/")
                for c in grant.cgroups
            ):
                continue
            if access & ~grant.access:
                continue
            return None
        return (
            f"no grant lets {agent} have {access!r} on pid {pid} "
            f"(uid {target.uid}, {target.exe}, cgroup {target.cgroup})"
        )
