"""What both sides of the puppet share: the wire, its errors, and ``/proc/PID/maps`` rows.

The puppet is two programs: the target process (:mod:`hmmirror.testing.puppet_target`,
standard library and ctypes only) and the controller that drives it from asyncio
(:class:`hmmirror.testing.puppet.Puppet`). They talk over one unix stream connection
per process, on an abstract socket the controller listens on; a forked child dials a
fresh connection::

    process -> controller   {"hello": pid}\\n                      once, on connect
    controller -> process   {"id": n, "op": "mmap", ...args, "nbytes": k}\\n  then k raw bytes
    process -> controller   {"id": n, "ok": true, "result": ..., "nbytes": k}\\n  then k raw bytes
                            {"id": n, "ok": false, "errno": e, "error": "..."}\\n

A failed system call comes back as :class:`OSError` with the kernel's errno; any other
failure as :class:`PuppetError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

PAGE_SIZE: Final = 4096

PROT_NONE: Final = 0x0
PROT_READ: Final = 0x1
PROT_WRITE: Final = 0x2
PROT_EXEC: Final = 0x4

#: Default deadline for one command, in seconds.
DEFAULT_TIMEOUT: Final = 10.0
#: An address that starts with this names an abstract unix socket (a leading NUL byte).
ABSTRACT_PREFIX: Final = "@"


class PuppetError(RuntimeError):
    """The puppet could not run a command for a reason other than a failed syscall."""


class PuppetDied(PuppetError):
    """The puppet's connection closed: the process exited or was killed."""


def parse_prot(prot: str | int) -> int:
    """Turn ``"rw"``, ``"r"``, ``"none"`` or ``""`` (or an int) into ``PROT_*`` bits."""
    if isinstance(prot, int):
        return prot
    bits = 0
    text = prot.lower()
    if text in ("none", ""):
        return PROT_NONE
    for ch in text:
        if ch == "r":
            bits |= PROT_READ
        elif ch == "w":
            bits |= PROT_WRITE
        elif ch == "x":
            bits |= PROT_EXEC
        elif ch != "-":
            raise ValueError(f"bad protection {prot!r}; use letters r, w, x or 'none'")
    return bits


@dataclass(frozen=True)
class Vma:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str
    offset: int
    path: str

    @property
    def readable(self) -> bool:
        """True if the VMA has ``r``."""
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        """True if the VMA has ``w``."""
        return self.perms[1] == "w"

    @property
    def shared(self) -> bool:
        """True for a ``MAP_SHARED`` VMA (``s``), False for private (``p``)."""
        return self.perms[3] == "s"


def read_maps(pid: int | str) -> list[Vma]:
    """Parse ``/proc/PID/maps`` (``pid`` may be ``"self"``)."""
    vmas: list[Vma] = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = parts[0].split("-")
            path = parts[5].rstrip("\n") if len(parts) > 5 else ""
            vmas.append(Vma(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), path))
    return vmas
