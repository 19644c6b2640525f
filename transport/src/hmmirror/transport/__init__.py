"""hmmirror's transport: the ZeroMQ sockets of servers (hmmd, hm-agent) and their clients.

It decides who may connect and binds every connection to what the kernel or
CURVE proved about its peer (``Peer``): ``server.Server`` on one side,
``dial.Dialer`` on the other, the ``door`` where clients knock, the ``zap``
handler for CURVE, ``keys`` for CURVE certificates, ``sockets`` for what
every socket shares (options, sends, the drain loop), ``errors`` for zmq's
failures as typed errors, and ``intake`` for both ends of the uffd intake.

The names below are imported on first use (PEP 562): a program that needs one module of
the package (the injector's helper takes ``door.recv_fds``) does not pay for pyzmq and the
rest, and hmmd waits for that helper to start.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hmmirror.transport.dial import Dialer, dial
    from hmmirror.transport.door import AddressInUse, Door, DoorError
    from hmmirror.transport.errors import Unreachable
    from hmmirror.transport.keys import AllowDir, CertificateError, CurveKeys, ServerKeys
    from hmmirror.transport.peer import Peer
    from hmmirror.transport.server import Connection, Limits, Server
    from hmmirror.transport.sockets import Drained

#: Where each exported name lives.
_HOME = {
    "Dialer": "dial", "dial": "dial", "AddressInUse": "door", "Door": "door",
    "DoorError": "door", "Unreachable": "errors", "AllowDir": "keys",
    "CertificateError": "keys", "CurveKeys": "keys", "ServerKeys": "keys", "Peer": "peer",
    "Connection": "server", "Limits": "server", "Server": "server", "Drained": "sockets",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    """An exported name, imported from its module on first use."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


__all__ = [
    "AddressInUse",
    "AllowDir",
    "CertificateError",
    "Connection",
    "CurveKeys",
    "Dialer",
    "Door",
    "DoorError",
    "Drained",
    "Limits",
    "Peer",
    "Server",
    "ServerKeys",
    "Unreachable",
    "dial",
]


class _Package(types.ModuleType):
    """This package: a submodule never hides an exported name it shares (the function
    ``dial`` and the module ``dial``). The import system sets each loaded submodule as an
    attribute of its package; imported eagerly, the function was bound after it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOME and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
