"""The uffd intake's sockets: where it is (``intake_path``, both ends) and the target's knock.

A target hands hmmd a userfaultfd of its own with one knock at hmmd's door
(``door``): the line ``uffd`` or ``uffd strict`` and the descriptor as
SCM_RIGHTS (``offer``). The words, their parsing and the bounds are
``hmmirror.proto.intake``'s; hmmd's end is a ``door`` handler for the word
``uffd`` that parses its argument with ``parse_option`` and judges the sender
by the door's ``Peer`` (SO_PEERCRED), never by what it says. The whole exchange
is SPEC.md §1.6.
"""

from __future__ import annotations

import errno
import os

from hmmirror.proto.intake import RUNTIME_DIR, SOCKET_NAME, encode_line, moved_owner
from hmmirror.transport.door import REFUSED, DoorError, knock, serves_a_tracer


def intake_path(endpoint: str) -> str:
    """Where a hmmd serving ``endpoint`` takes userfaultfds, unless configured otherwise:
    an ``ipc://`` endpoint's own socket, else ``hmmd.uffd.sock`` in the runtime directory
    (the first of ``$RUNTIME_DIRECTORY``, as systemd sets it, or /run/hmmirror)."""
    if endpoint.startswith("ipc://"):
        return endpoint[len("ipc://") :]
    runtime = os.environ.get("RUNTIME_DIRECTORY", RUNTIME_DIR).split(":")[0]
    return os.path.join(runtime, SOCKET_NAME)


class OfferMoved(DoorError):
    """The intake refused: another hmmd of the host, at ``owner``, watches the process."""

    def __init__(self, where: str, why: str, owner: str) -> None:
        super().__init__(errno.EPERM, where, why)
        self.owner = owner


def offer(path: str, fd: int, *, strict: bool = False, timeout: float = 5.0) -> None:
    """The target's end: hand ``fd`` (a userfaultfd of this process) to the intake at
    ``path``; raise DoorError unless hmmd took it (OfferMoved when it names the hmmd that
    watches the process), or when what serves ``path`` could not ptrace this process.
    The caller keeps (and closes) its copy."""
    try:
        # A userfaultfd lets its holder fill this process's pages: only to a process that
        # could ptrace it anyway (the kernel's rule), whoever bound the path.
        knock(path, encode_line(strict), fd, timeout, vet=serves_a_tracer)
    except DoorError as exc:
        owner = moved_owner(exc.why.removeprefix(REFUSED))
        if owner is None:
            raise
        raise OfferMoved(exc.where, exc.why, owner) from exc
