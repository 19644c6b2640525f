"""zmq's failures, translated once into hmmirror's typed transport errors.

pyzmq raises ``zmq.Again`` (EAGAIN) when a non-blocking send finds the peer's
pipe full, or finds no pipe at all (a DEALER whose connection closed says
EAGAIN too); ``zmq.ContextTerminated`` (ETERM) once the context is shut down;
EHOSTUNREACH from a ``ROUTER_MANDATORY`` ROUTER that has no such peer; and
ENOTSOCK on a closed socket. A send that zmq refuses becomes ``Unreachable``
with a one-line reason from here, and nowhere else: the caller names the peer,
and the daemon and the client turn it into their own errors (an eviction, a
``DaemonUnavailable``), chained ``from`` the zmq exception so a log keeps the cause.
"""

from __future__ import annotations

import zmq


class Unreachable(Exception):
    """A message could not be queued to a peer (gone, or its pipe is full)."""


#: Why a send failed, by zmq errno, in the words the logs and tests know.
_REASONS: dict[int, str] = {
    int(zmq.EAGAIN): "send queue full (or its connection closed)",
    int(zmq.ETERM): "the ZeroMQ context was shut down",
    int(zmq.EHOSTUNREACH): "no connection to it",
    int(zmq.ENOTSOCK): "its socket is closed",
}


def reason(exc: zmq.ZMQError) -> str:
    """One line saying why zmq refused: the known cases in our words, else zmq's own."""
    known = _REASONS.get(exc.errno) if exc.errno is not None else None
    return known or exc.strerror or type(exc).__name__


def unreachable(exc: zmq.ZMQError, peer: str) -> Unreachable:
    """The typed error for a send to ``peer`` that zmq refused with ``exc``; the caller
    raises it ``from exc``."""
    return Unreachable(f"{peer}: {reason(exc)}")
