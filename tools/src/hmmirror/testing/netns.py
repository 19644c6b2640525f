"""Hosts for multi-node tests: network namespaces on one bridge, addresses in 10.231.0.0/24.

``Cluster`` creates a switch namespace holding a bridge, and one namespace per
host joined to it by a veth pair; host ``i`` gets 10.231.0.``i``/24 on its
``eth0``. Processes run in a host with ``host.spawn(argv)`` (``ip netns exec``;
they share the filesystem and pid namespace, so hmmd in one host can watch a
target anywhere). ``host.cut()`` and ``host.heal()`` take its link down and up.
Everything is removed on exit, even after a failure: the processes the cluster
started are killed, then the namespaces (and with them the veths) deleted.
Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

SUBNET = "10.231.0"
#: How long any ``ip`` command may take.
IP_DEADLINE = 10.0


def _ip(*args: str) -> None:
    """Run ``ip ARGS``; raise with its stderr on failure."""
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_DEADLINE)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


@dataclass
class Host:
    """One network namespace on the cluster's bridge."""

    name: str
    index: int
    switch: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def addr(self) -> str:
        """This host's address."""
        return f"{SUBNET}.{self.index}"

    @property
    def _switch_end(self) -> str:
        """The veth end in the switch namespace (interface names are at most 15 bytes)."""
        return f"s{self.name[-8:]}"

    def spawn(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside this host; the cluster kills it at the end."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", self.name, *argv], start_new_session=True, **kwargs
        )
        self.procs.append(proc)
        return proc

    def cut(self) -> None:
        """Take this host's link down: its packets go nowhere until ``heal``."""
        _ip("-n", self.switch, "link", "set", self._switch_end, "down")

    def heal(self) -> None:
        """Bring the link back up."""
        _ip("-n", self.switch, "link", "set", self._switch_end, "up")

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal one of this host's processes (SIGKILL, SIGSTOP, SIGCONT...)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


class Cluster:
    """``with Cluster(3) as (a, b, c):`` hosts joined by a bridge; removed on exit."""

    def __init__(self, n: int) -> None:
        if not 1 <= n <= 200:
            raise ValueError("a cluster has 1 to 200 hosts")
        tag = secrets.token_hex(3)
        self.switch = f"hmsw-{tag}"
        self.hosts = [Host(f"hmh{i}-{tag}", i, self.switch) for i in range(1, n + 1)]

    def __enter__(self) -> list[Host]:
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for host in self.hosts:
                _ip("netns", "add", host.name)
                peer = host._switch_end
                _ip("-n", host.name, "link", "add", "eth0", "type", "veth", "peer", "name", peer,
                    "netns", self.switch)  # fmt: skip
                _ip("-n", self.switch, "link", "set", peer, "master", "br0")
                _ip("-n", self.switch, "link", "set", peer, "up")
                _ip("-n", host.name, "addr", "add", f"{host.addr}/24", "dev", "eth0")
                _ip("-n", host.name, "link", "set", "eth0", "up")
                _ip("-n", host.name, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self.hosts

    def __exit__(self, *exc: object) -> None:
        for host in self.hosts:
            for proc in host.procs:
                host.kill(proc, signal.SIGCONT)  # a stopped process cannot die of SIGKILL
                host.kill(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(IP_DEADLINE)
                for pipe in (proc.stdin, proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()
        for name in [h.name for h in self.hosts] + [self.switch]:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _ip("netns", "del", name)


@contextlib.contextmanager
def cluster(n: int) -> Iterator[list[Host]]:
    """``Cluster(n)`` as a generator context manager."""
    with Cluster(n) as hosts:
        yield hosts
