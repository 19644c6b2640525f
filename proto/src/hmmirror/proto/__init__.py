"""hmmirror's wire protocol: messages, codec, errors and page-entry encoding.

Also the uffd intake's words and bounds (``intake``), the one exchange that is a
door line rather than a message.

Pure: no sockets, no I/O, no event loop. The daemon and the client import it;
it imports neither.
"""

from hmmirror.proto.codec import Envelope, decode, encode
from hmmirror.proto.errors import (
    AuthError,
    DecodeError,
    ErrorCode,
    ProtocolError,
    TooLarge,
    UnknownMessage,
    VersionError,
)
from hmmirror.proto.messages import (
    MAX_DMA_PAGES,
    MAX_FAULT_PAGES,
    MAX_FRAME,
    TYPES,
    Access,
    Event,
    FaultMode,
)
from hmmirror.proto.version import PROTOCOL_VERSION, RETRY_BUDGET

__all__ = [
    "MAX_DMA_PAGES",
    "MAX_FAULT_PAGES",
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "RETRY_BUDGET",
    "TYPES",
    "Access",
    "AuthError",
    "DecodeError",
    "Envelope",
    "ErrorCode",
    "Event",
    "FaultMode",
    "ProtocolError",
    "TooLarge",
    "UnknownMessage",
    "VersionError",
    "decode",
    "encode",
]
