"""CURVE keys: generate, load, find in the environment, and the allow-list of a server.

Keys are ZeroMQ certificate files (``zmq.auth``): ``NAME.key`` holds the public
key and may be shared; ``NAME.key_secret`` holds both keys and is written with
mode 0600. A server (hmmd, hm-agent) admits a client whose ``NAME.key`` sits in
its allow-list directory; the client needs the server's public ``.key`` and its
own ``.key_secret``.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import zmq.auth

log = logging.getLogger(__name__)

#: Environment variables naming the certificate files a client uses by default.
SERVER_KEY_ENV = "HMMIRROR_SERVER_KEY"
CLIENT_KEY_ENV = "HMMIRROR_CLIENT_KEY"


class CertificateError(ValueError):
    """A certificate file is missing, unreadable, malformed, or readable by others."""


@dataclass(frozen=True)
class CurveKeys:
    """What a CURVE client needs: the server's public key and its own key pair (Z85 bytes)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_cert: str, client_cert: str) -> CurveKeys:
        """From the server's public certificate and this client's secret certificate."""
        server_public, _ = _load(server_cert)
        public, secret = _load(client_cert)
        if secret is None:
            raise CertificateError(f"{client_cert} holds no secret key (use the .key_secret file)")
        return cls(server_public, public, secret)

    @classmethod
    def from_env(cls) -> CurveKeys | None:
        """From ``$HMMIRROR_SERVER_KEY`` and ``$HMMIRROR_CLIENT_KEY``, when both are set."""
        server, client = os.environ.get(SERVER_KEY_ENV), os.environ.get(CLIENT_KEY_ENV)
        if not server or not client:
            return None
        return cls.load(server, client)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE client with these keys (before it connects)."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


@dataclass(frozen=True)
class ServerKeys:
    """A CURVE server's own key pair (Z85 bytes), from its ``.key_secret`` certificate."""

    public: bytes
    secret: bytes

    @classmethod
    def load(cls, cert: str) -> ServerKeys:
        """Load ``cert``, refusing one that others could read or that holds no secret key."""
        check_secret_file(cert)
        public, secret = _load(cert)
        if secret is None:
            raise CertificateError(f"{cert} holds no secret key (use the .key_secret file)")
        return cls(public, secret)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE server with these keys (before it binds)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True


def _load(path: str) -> tuple[bytes, bytes | None]:
    """``zmq.auth.load_certificate`` with one-line errors."""
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CertificateError(f"cannot load CURVE certificate {path}: {exc}") from exc


def check_secret_file(path: str) -> None:
    """Refuse a secret key file that others could read (or that is missing)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise CertificateError(f"cannot read {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise CertificateError(
            f"{path} is readable by others (mode {mode & 0o777:o}); chmod 600 it"
        )


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


def z85_of_file(path: str) -> str:
    """The Z85 public key in certificate ``path`` (for policies and grants)."""
    return _load(path)[0].decode()


class AllowDir:
    """An allow-list: the public keys of the ``*.key`` certificates in a directory.

    The directory is read again whenever it changed (or on ``reload``), so an
    operator admits or removes a client by adding or deleting its certificate,
    without a restart. Safe to call from the ZAP thread and the loop alike.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._stamp: tuple[int, int] | None = None
        self._keys: frozenset[bytes] = frozenset()
        self._lock = threading.Lock()

    def readable(self) -> bool:
        """Whether the directory can be listed now."""
        return os.path.isdir(self.directory) and os.access(self.directory, os.R_OK | os.X_OK)

    def reload(self) -> None:
        """Forget the cached listing: the next lookup reads the directory again."""
        with self._lock:
            self._stamp = None

    def _refresh(self) -> None:
        """Reread the certificates if the directory changed since the last look."""
        try:
            st = os.stat(self.directory)
        except OSError:
            self._keys = frozenset()
            self._stamp = None
            return
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            keys: set[bytes] = set()
            try:
                names = sorted(os.listdir(self.directory))
            except OSError as exc:
                log.warning("cannot read the allow-list %s: %s", self.directory, exc)
                names = []
            for name in names:
                if not name.endswith(".key"):
                    continue
                path = os.path.join(self.directory, name)
                try:  # one bad file is skipped, never the whole list
                    keys.add(zmq.auth.load_certificate(path)[0])
                except (OSError, ValueError) as exc:
                    log.warning("allow-list %s: skipping %s: %s", self.directory, name, exc)
            self._keys, self._stamp = frozenset(keys), stamp

    def allows(self, key: bytes) -> bool:
        """Whether the Z85 public ``key`` is in the directory now."""
        with self._lock:
            self._refresh()
            return key in self._keys
