"""Who may use which of an agent's MRs, and how: the RDMA service's grants.

A requester is known by what the listener proved about it: ``curve:KEY`` (the
Z85 public key the ZAP handler admitted, on ``tcp://``), ``uid:N`` (the kernel's
SO_PEERCRED, on ``ipc://``), or nothing at all (``None``: a plain-TCP listener
with ``insecure = true``). A grant gives a requester (or ``any``, every
requester, unauthenticated ones included) rights on named MRs:

    --grant curve:KEY:mr1,mr2:rw        --grant /etc/hmmirror/keys/host-b.key:*:r
    [[grant]]
    requesters = ["uid:1000", "/etc/hmmirror/keys/host-b.key"]
    mrs = ["mr1"]
    rights = "rwa"

Rights are ``r`` (REMOTE_READ), ``w`` (REMOTE_WRITE) and ``a`` (REMOTE_ATOMIC);
what an access may do is what both the grants and the MR's own access flags
allow. A requester with no grant has no MR: every access is REMOTE_ACCESS, as
for an unknown rkey.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import zmq.auth
from hmmirror.client.mlx5.verbs import AccessFlags

#: Every requester: authenticated or not (an ``insecure`` listener's peers).
ANY = "any"
#: In a grant's MR list: every MR of the agent.
ALL_MRS = "*"
#: What an MR name looks like (``--mr NAME=SPEC``); the default names are mr1, mr2, ...
MR_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_RIGHTS = {
    "r": AccessFlags.REMOTE_READ,
    "w": AccessFlags.REMOTE_WRITE,
    "a": AccessFlags.REMOTE_ATOMIC,
}
_Z85_KEY = re.compile(r"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_UID = re.compile(r"^uid:\d{1,10}$")


class GrantError(ValueError):
    """A grant that cannot be read: bad requester, unknown MR, bad rights."""


@dataclass(frozen=True)
class Grant:
    """``requester`` (``curve:KEY``, ``uid:N`` or ``any``) may use ``mrs`` with ``rights``."""

    requester: str
    mrs: tuple[str, ...]
    rights: AccessFlags


def parse_rights(text: str) -> AccessFlags:
    """``r``, ``w``, ``a`` letters as REMOTE_* flags."""
    if not text or set(text) - set(_RIGHTS):
        raise GrantError(f"rights {text!r} are not a combination of r, w, a")
    out = AccessFlags(0)
    for letter in text:
        out |= _RIGHTS[letter]
    return out


def parse_requester(text: str) -> str:
    """``any``, ``uid:N``, ``curve:KEY``, or a CURVE certificate file (its public key)."""
    if text == ANY or _UID.match(text):
        return text
    if text.startswith("curve:"):
        if not _Z85_KEY.match(text[len("curve:") :]):
            raise GrantError(f"{text!r} is not curve: and a 40-character Z85 public key")
        return text
    if os.sep in text or text.endswith((".key", ".key_secret")):
        try:
            public, _ = zmq.auth.load_certificate(text)
        except (OSError, ValueError) as exc:
            raise GrantError(f"cannot read the certificate {text}: {exc}") from exc
        return f"curve:{public.decode('ascii')}"
    raise GrantError(f"{text!r} is not 'any', 'uid:N', 'curve:KEY' or a certificate file")


def parse_grant(text: str) -> Grant:
    """``REQUESTER:MR1,MR2:RIGHTS`` (MRs ``*`` for all of them), as ``--grant`` takes it."""
    who, sep, rest = text.rpartition(":")
    who, sep2, mrs = who.rpartition(":")
    if not (sep and sep2 and who):
        raise GrantError(f"--grant {text!r}: expected REQUESTER:MR1,MR2:RIGHTS")
    try:
        return Grant(parse_requester(who), _mr_names(mrs.split(",")), parse_rights(rest))
    except GrantError as exc:
        raise GrantError(f"--grant {text!r}: {exc}") from exc


def grant_from_table(table: Any, where: str) -> list[Grant]:
    """A ``[[grant]]`` table (``requesters``, ``mrs``, ``rights``), or a ``--grant`` string."""
    if isinstance(table, str):
        return [parse_grant(table)]
    if not isinstance(table, dict) or set(table) != {"requesters", "mrs", "rights"}:
        raise GrantError(f"{where}: a grant needs exactly requesters, mrs and rights")
    who, mrs, rights = table["requesters"], table["mrs"], table["rights"]
    if not _strings(who) or not _strings(mrs) or not isinstance(rights, str):
        raise GrantError(f"{where}: requesters and mrs are lists of strings, rights a string")
    try:
        flags, names = parse_rights(rights), _mr_names(mrs)
        return [Grant(parse_requester(w), names, flags) for w in who]
    except GrantError as exc:
        raise GrantError(f"{where}: {exc}") from exc


def _strings(value: Any) -> bool:
    """A non-empty list of strings."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _mr_names(names: Iterable[str]) -> tuple[str, ...]:
    """Checked MR names (``*`` stands for every MR)."""
    out = tuple(names)
    for name in out:
        if name != ALL_MRS and not MR_NAME.match(name):
            raise GrantError(f"{name!r} is not an MR name (letters, digits, _ . -) or *")
    return out


class Grants:
    """The grants resolved against the agent's MRs: rights by requester and MR number."""

    def __init__(self, grants: Iterable[Grant] = (), mrs: Mapping[str, int] | None = None) -> None:
        mrs = mrs or {}
        self._rights: dict[str, dict[int, AccessFlags]] = {}
        for grant in grants:
            table = self._rights.setdefault(grant.requester, {})
            for name in grant.mrs:
                if name != ALL_MRS and name not in mrs:
                    raise GrantError(
                        f"a grant to {grant.requester} names MR {name!r}, which this agent "
                        f"does not register (it has {', '.join(sorted(mrs)) or 'none'})"
                    )
                for mrn in mrs.values() if name == ALL_MRS else (mrs[name],):
                    table[mrn] = table.get(mrn, AccessFlags(0)) | grant.rights
        self._any = self._rights.get(ANY, {})

    def rights(self, requester: str | None, mrn: int) -> AccessFlags:
        """What ``requester`` (None: unauthenticated) was granted on MR ``mrn``."""
        granted = self._any.get(mrn, AccessFlags(0))
        if requester is not None:
            granted |= self._rights.get(requester, {}).get(mrn, AccessFlags(0))
        return granted

    def __len__(self) -> int:
        """How many requesters (``any`` counted as one) hold a grant."""
        return len(self._rights)
