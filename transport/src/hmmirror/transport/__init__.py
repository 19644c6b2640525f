"""hmmirror's transport: the ZeroMQ sockets of servers (hmmd, hm-agent) and their clients.

It decides who may connect and binds every connection to what the kernel or
CURVE proved about its peer (``Peer``): ``server.Server`` on one side,
``dial.Dialer`` on the other, the ``door`` where clients knock, the ``zap``
handler for CURVE, ``keys`` for CURVE certificates, ``sockets`` for what
every socket shares (options, sends, the drain loop), ``errors`` for zmq's
failures as typed errors, and ``intake`` for both ends of the uffd intake.
"""

from hmmirror.transport.dial import Dialer, dial
from hmmirror.transport.door import AddressInUse, Door, DoorError
from hmmirror.transport.errors import Unreachable
from hmmirror.transport.keys import AllowDir, CertificateError, CurveKeys, ServerKeys
from hmmirror.transport.peer import Peer
from hmmirror.transport.server import Connection, Limits, Server
from hmmirror.transport.sockets import Drained

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
