"""CURVE keys for connections over TCP: generate, load, and find in the environment.

The implementation lives in ``hmmirror.transport.keys``, which servers share;
this module is where the agent library has always exported it from.
"""

from hmmirror.transport.keys import (
    CLIENT_KEY_ENV,
    SERVER_KEY_ENV,
    CertificateError,
    CurveKeys,
    generate,
)

__all__ = ["CLIENT_KEY_ENV", "SERVER_KEY_ENV", "CertificateError", "CurveKeys", "generate"]
