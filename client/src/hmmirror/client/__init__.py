"""hmmirror's agent library: sessions with hmmd, mirrors and their device page tables.

>>> async with connect("ipc:///run/hmmirror/hmmd.sock", name="agent") as session:
...     mirror = await session.mirror(pid, start, length, Access.READ | Access.WRITE)
...     result = await mirror.read(start, 4)
"""

from hmmirror.client._lifecycle import State
from hmmirror.client._oneshot import status
from hmmirror.client.errors import (
    AgentError,
    DaemonUnavailable,
    DeviceError,
    MirrorEvicted,
    Moved,
    RemoteError,
    RequestTimeout,
    SyncIncomplete,
    UnexpectedReply,
)
from hmmirror.client.group import SessionGroup, connect_group
from hmmirror.client.mirror import Mirror, ReadResult, WriteResult
from hmmirror.client.session import Session, connect
from hmmirror.client.target import expose
from hmmirror.proto.messages import Access, Event

__all__ = [
    "Access",
    "AgentError",
    "DaemonUnavailable",
    "DeviceError",
    "Event",
    "Mirror",
    "MirrorEvicted",
    "Moved",
    "ReadResult",
    "RemoteError",
    "RequestTimeout",
    "Session",
    "SessionGroup",
    "State",
    "SyncIncomplete",
    "UnexpectedReply",
    "WriteResult",
    "connect",
    "connect_group",
    "expose",
    "status",
]

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("hmmirror.client."):
        _obj.__module__ = "hmmirror.client"
