"""The uffd intake's protocol: how a target hands hmmd a userfaultfd of its own.

SPEC.md §1.6 is the normative text. One Unix-socket connection per descriptor:
the target sends the line ``uffd`` (or ``uffd strict``, for the second
userfaultfd strict-write mirrors need) with the descriptor as SCM_RIGHTS, and
hmmd answers ``ok`` or ``error <why>`` as every door does. This module holds
what both ends must agree on: the words, where the intake is, and how long hmmd
keeps what it is offered. Pure: the sockets are in ``hmmirror.transport.intake``.
"""

from __future__ import annotations

#: The line's first word (the door's handler name).
WORD = "uffd"
#: The one option: the descriptor is the strict-write userfaultfd.
STRICT = "strict"
#: The intake of a ``tcp://`` hmmd: this file in its runtime directory (an ``ipc://``
#: hmmd's intake is its endpoint's own socket).
SOCKET_NAME = "hmmd.uffd.sock"
#: hmmd's runtime directory when systemd names none (``RUNTIME_DIRECTORY``).
RUNTIME_DIR = "/run/hmmirror"
#: How long hmmd keeps an offer for a process nothing mirrors yet, in seconds.
OFFER_TTL = 30.0
#: Offers hmmd keeps per uid (a process may have a plain and a strict one).
OFFERS_PER_UID = 16
#: The first word of a refusal that names the hmmd of this host that watches the process
#: (SPEC.md §1.7): ``error moved: <endpoint>``. A target given several hmmds offers there.
MOVED = "moved:"


def encode_line(strict: bool) -> bytes:
    """The line a target sends with its userfaultfd (without the newline the door adds)."""
    return f"{WORD} {STRICT}".encode() if strict else WORD.encode()


def parse_option(arg: str) -> bool:
    """Whether the line's argument (what follows ``uffd``) offers the strict userfaultfd;
    ValueError, with the reason to answer, for anything but nothing or ``strict``."""
    if arg == STRICT:
        return True
    if arg:
        raise ValueError(f"unknown option {arg!r} of {WORD!r} (only {STRICT!r})")
    return False


def moved(owner: str) -> str:
    """The refusal that sends a target to ``owner``, the hmmd that watches its process."""
    return f"{MOVED} {owner}"


def moved_owner(reason: str) -> str | None:
    """The endpoint a ``moved:`` refusal names (``reason`` is what follows ``error``), or
    None for any other refusal."""
    if not reason.startswith(MOVED):
        return None
    owner = reason[len(MOVED) :].strip()
    return owner or None
