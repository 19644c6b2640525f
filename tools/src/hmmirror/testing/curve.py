"""hmmd over CURVE for one test: real keys, one allowed client, hmmd on tcp loopback.

Tests of who may reach a tcp:// hmmd (hmmctl's key flags and variables, a client
without keys, the tracer's grant check) need the same rig: a key pair for hmmd and
one for a client, both made by the real ``hmmctl keys generate``; an allow-list
directory holding the client's public key; and hmmd started on ``tcp://127.0.0.1:0``
with ``--curve-key`` and ``--curve-allow``. :func:`curve_hmmd` builds it under a
test's directory (``keys/``, ``allow/``, ``hmmd.log``) and stops hmmd after the
block; :data:`NO_KEY_ENV` is the environment that hides the caller's own keys.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hmmirror.testing.hmmd import HmmdProcess, start_hmmd

__all__ = ["HMMCTL", "NO_KEY_ENV", "CurveHmmd", "curve_hmmd", "generate_keys"]

#: ``hmmctl`` as this interpreter runs it.
HMMCTL = [sys.executable, "-m", "hmmirror.tools.ctlapp"]
#: Environment entries that leave hmmctl and hm-agent no CURVE keys but those on the line.
NO_KEY_ENV = {"HMMIRROR_SERVER_KEY": "", "HMMIRROR_CLIENT_KEY": ""}


def generate_keys(keys: Path, name: str) -> None:
    """``hmmctl keys generate KEYS NAME``; AssertionError with its stderr if it fails."""
    made = subprocess.run(
        [*HMMCTL, "keys", "generate", str(keys), name],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if made.returncode != 0:
        raise AssertionError(f"hmmctl keys generate {name} exited {made.returncode}: {made.stderr}")


@dataclass(frozen=True)
class CurveHmmd:
    """A running CURVE hmmd, its key directory and the one client its allow-list admits."""

    daemon: HmmdProcess
    #: Where ``hmmd.key``, ``hmmd.key_secret`` and the client's pair are.
    keys: Path
    #: The ``--curve-allow`` directory: the client's public key only.
    allow: Path
    #: The client's key name.
    client: str

    @property
    def endpoint(self) -> str:
        """The tcp:// endpoint hmmd bound."""
        return self.daemon.endpoint

    @property
    def server_key(self) -> str:
        """hmmd's public certificate (``--server-key``, ``HMMIRROR_SERVER_KEY``)."""
        return str(self.keys / "hmmd.key")

    @property
    def client_key(self) -> str:
        """The allowed client's secret certificate (``--client-key``, ``HMMIRROR_CLIENT_KEY``)."""
        return str(self.keys / f"{self.client}.key_secret")


@contextlib.contextmanager
def curve_hmmd(workdir: Path, client: str = "me", grace: float = 10.0) -> Iterator[CurveHmmd]:
    """hmmd over CURVE admitting ``client`` only, for the block; stopped with ``grace`` s after.

    Keys go to ``workdir/keys``, the allow-list to ``workdir/allow`` (which must not
    exist yet) and hmmd's stderr to ``workdir/hmmd.log``.
    """
    keys, allow = workdir / "keys", workdir / "allow"
    for name in ("hmmd", client):
        generate_keys(keys, name)
    allow.mkdir()
    (allow / f"{client}.key").write_bytes((keys / f"{client}.key").read_bytes())
    daemon = start_hmmd(
        "tcp://127.0.0.1:0",
        ["--curve-key", str(keys / "hmmd.key_secret"), "--curve-allow", str(allow)],
        log_path=str(workdir / "hmmd.log"),
    )
    try:
        yield CurveHmmd(daemon, keys, allow, client)
    finally:
        daemon.stop(grace)
