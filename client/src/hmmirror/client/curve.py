"""CURVE keys for connections to hmmd over TCP: generate, load, and find in the environment.

Keys are ZeroMQ certificate files (``zmq.auth``): ``NAME.key`` holds the public
key and may be shared; ``NAME.key_secret`` holds both keys and is written with
mode 0600. hmmd admits an agent whose ``NAME.key`` sits in its ``curve_allow``
directory; the agent needs hmmd's public ``.key`` and its own ``.key_secret``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq.auth

#: Environment variables naming the certificate files a client uses by default.
SERVER_KEY_ENV = "HMMIRROR_SERVER_KEY"
CLIENT_KEY_ENV = "HMMIRROR_CLIENT_KEY"


@dataclass(frozen=True)
class CurveKeys:
    """What a CURVE client needs: the server's public key and its own key pair (Z85 bytes)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_cert: str, client_cert: str) -> CurveKeys:
        """From hmmd's public certificate and this client's secret certificate."""
        server_public, _ = zmq.auth.load_certificate(server_cert)
        public, secret = zmq.auth.load_certificate(client_cert)
        if secret is None:
            raise ValueError(f"{client_cert} holds no secret key (use the .key_secret file)")
        return cls(server_public, public, secret)

    @classmethod
    def from_env(cls) -> CurveKeys | None:
        """From ``$HMMIRROR_SERVER_KEY`` and ``$HMMIRROR_CLIENT_KEY``, when both are set."""
        server, client = os.environ.get(SERVER_KEY_ENV), os.environ.get(CLIENT_KEY_ENV)
        if not server or not client:
            return None
        return cls.load(server, client)

    def apply(self, sock: zmq.Socket) -> None:  # type: ignore[type-arg]
        """Make ``sock`` a CURVE client with these keys (before it connects)."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def generate(directory: str, name: str) -> tuple[str, str]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (mode 0600); return both paths."""
    os.makedirs(directory, exist_ok=True)
    old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret
