"""hmmirror's pytest plugin: multi-node rigs as fixtures, for anyone's integration tests.

Installed with hmmirror-tools and registered through the ``pytest11`` entry
point, so a test file anywhere can simply ask for:

- ``hmmirror_network(hosts=3)``: hosts as network namespaces on a bridge
  (10.231.0.0/24), hmmd over CURVE in the first, ``net.agent(host, name, pid,
  addr, npages)`` for agents in any host, ``net.restart_daemon()``,
  ``host.cut()`` / ``host.heal()``, ``agent.signal(SIGSTOP)``;
- ``hmmirror_target(npages, fill)``: a process whose memory the agents mirror,
  with ``write`` and ``dontneed``.

Everything is torn down after the test, failed or not. The rigs need root and
iproute2; without them the fixtures skip and say why.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator

import pytest
from hmmirror.testing.multinode import Network, RigTarget


def pytest_configure(config: pytest.Config) -> None:
    """Declare the marker hmmirror's rigs go with."""
    config.addinivalue_line("markers", "multinode: tests that build network namespaces")


@pytest.fixture
def hmmirror_network(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Network]]:
    """A factory of ``Network`` rigs; every one made is removed after the test."""
    made: list[Network] = []

    def make(hosts: int = 2, *, ack_deadline: str = "1s") -> Network:
        """``hosts`` network namespaces with hmmd in the first."""
        if os.geteuid() != 0:
            pytest.skip("hmmirror_network needs root: it creates network namespaces")
        if shutil.which("ip") is None:
            pytest.skip("hmmirror_network needs iproute2's ip, which is not installed")
        net = Network(hosts, tmp_path_factory.mktemp("hmmirror-net"), ack_deadline=ack_deadline)
        net.__enter__()
        made.append(net)
        return net

    yield make
    for net in reversed(made):
        net.__exit__()


@pytest.fixture
def hmmirror_target() -> Iterator[Callable[..., RigTarget]]:
    """A factory of ``RigTarget`` processes; every one made is ended after the test."""
    made: list[RigTarget] = []

    def make(npages: int = 1, fill: bytes = b"A") -> RigTarget:
        """A process with ``npages`` of anonymous memory filled with ``fill``."""
        target = RigTarget(npages, fill)
        made.append(target)
        return target

    yield make
    for target in made:
        target.close()
