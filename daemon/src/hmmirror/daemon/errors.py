"""The daemon's typed request failures: each becomes an ``error`` reply with its code."""

from __future__ import annotations

from hmmirror.proto.errors import ErrorCode


class RequestError(Exception):
    """A request that cannot be served; ``code`` and ``message`` go on the wire."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
