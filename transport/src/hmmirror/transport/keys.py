"""CURVE keys: generate, load, find in the environment, and the allow-list of a server.

Keys are ZeroMQ certificate files (``zmq.auth``): ``NAME.key`` holds the public
key and may be shared; ``NAME.key_secret`` holds both keys and is written with
mode 0600. A server (hmmd, hm-agent) admits a client whose ``NAME.key`` sits in
its allow-list directory; the client needs the server's public ``.key`` and its
own ``.key_secret``. A certificate whose keys are not 32-byte Z85 keys is refused
when it is loaded, before any socket takes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

import zmq.auth
from hmmirror.transport.settings import untrusted
from zmq.utils import z85

log = logging.getLogger(__name__)

#: Environment variables naming the certificate files a client uses by default.
SERVER_KEY_ENV = "HMMIRROR_SERVER_KEY"
CLIENT_KEY_ENV = "HMMIRROR_CLIENT_KEY"
#: A key pair's name: it becomes NAME.key and NAME.key_secret, in the directory and only there.
KEY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


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
        """From the server's public certificate and this client's secret certificate (which
        others may not read, as for the server's own: ``check_secret_file``)."""
        server_public, _ = _load(server_cert)
        public, secret = _load(client_cert)
        if secret is not None:
            check_secret_file(client_cert)
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
    """``zmq.auth.load_certificate`` with one-line errors, its keys checked."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CertificateError(f"cannot load CURVE certificate {path}: {exc}") from exc
    for which, key in (("public", public), ("secret", secret)):
        if key is not None and not _is_key(key):
            raise CertificateError(
                f"CURVE certificate {path}: its {which} key is not a 40-character Z85 key"
            )
    return public, secret


def _is_key(key: bytes) -> bool:
    """Whether ``key`` is a CURVE key in Z85 (40 characters, 32 bytes)."""
    if len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):  # a character outside Z85's alphabet
        return False


def check_secret_file(path: str) -> None:
    """Refuse a secret key file that others could read, or that is not root's or this
    program's user's (another user could give it the key of their choosing), or missing."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CertificateError(f"cannot read {path}: {exc.strerror}") from exc
    if st.st_mode & 0o077:
        raise CertificateError(
            f"{path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it"
        )
    why = untrusted(st)
    if why is not None:
        raise CertificateError(f"{path}: {why}")


def generate(directory: str, name: str, *, force: bool = False) -> tuple[str, str]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (mode 0600); return both paths.

    ``name`` is a plain file name (letters, digits, ``_ . -``; ValueError otherwise), so
    nothing is written outside ``directory``. Existing keys are kept (FileExistsError,
    nothing written) unless ``force`` replaces them.
    """
    if not KEY_NAME.match(name):
        raise ValueError(
            f"key name {name!r} is not letters, digits, _ . - (at most 64, no leading . or -)"
        )
    public = os.path.join(directory, f"{name}.key")
    secret = os.path.join(directory, f"{name}.key_secret")
    os.makedirs(directory, exist_ok=True)
    if not force:
        for path in (public, secret):
            if os.path.lexists(path):
                raise FileExistsError(
                    f"{path} exists; keep it, or replace both keys of {name!r} (--force)"
                )
    # Made aside, then moved in: the pair appears whole, and link() never replaces a key
    # that another run created meanwhile.
    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=directory)
    linked: list[str] = []
    try:
        old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
        try:
            made_public, made_secret = zmq.auth.create_certificates(staging, name)
        finally:
            os.umask(old)
        os.chmod(made_secret, 0o600)
        os.chmod(made_public, 0o644)
        for made, path in ((made_secret, secret), (made_public, public)):
            if force:
                os.replace(made, path)
            else:
                os.link(made, path)  # FileExistsError: another run made it meanwhile
                linked.append(path)
    except BaseException:
        for path in linked:  # half a pair is worse than none
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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
                    why = untrusted(os.stat(path))
                    if why is not None:  # who may write it could add a key of their own
                        raise ValueError(why)
                    keys.add(zmq.auth.load_certificate(path)[0])
                except (OSError, ValueError) as exc:
                    log.warning("allow-list %s: skipping %s: %s", self.directory, name, exc)
            self._keys, self._stamp = frozenset(keys), stamp

    def allows(self, key: bytes) -> bool:
        """Whether the Z85 public ``key`` is in the directory now."""
        with self._lock:
            self._refresh()
            return key in self._keys
