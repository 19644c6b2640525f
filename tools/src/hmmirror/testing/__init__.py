"""Test helpers for hmmirror users: real processes driven from Python, and hmmd itself.

- :class:`~hmmirror.testing.puppet.Puppet` starts ``python -m
  hmmirror.testing.puppet_target``, a process that really mmaps, writes, forks and
  exits on command, so that a daemon watching it sees genuine kernel state
  (``/proc/PID/maps``, pagemap, userfaultfd);
- :mod:`hmmirror.testing.hmmd` is the one way to start hmmd and wait for it to be
  ready, and :mod:`hmmirror.testing.quiesce` the one wait until it has nothing in
  flight;
- :mod:`hmmirror.testing.rawpeer` is a raw protocol peer for tests of the wire itself,
  :mod:`hmmirror.testing.curve` a CURVE hmmd with real keys and one allowed client,
  :mod:`hmmirror.testing.pagemap` a target's ``/proc/PID/pagemap`` read by the test,
  :mod:`hmmirror.testing.proctree` the processes a test started, followed through ``/proc``;
- :mod:`hmmirror.testing.plugin` is the pytest plugin (multi-node rigs).

The names are imported lazily: ``python -m hmmirror.testing.puppet_target`` imports
this package first, and the puppet target should not pay for the controller's
imports (asyncio, the daemon's procfs, numpy) it never uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hmmirror.testing.puppet import Puppet, PuppetDied, PuppetError, Vma

__all__ = ["Puppet", "PuppetDied", "PuppetError", "Vma"]


def __getattr__(name: str) -> Any:
    """Import the public names of :mod:`hmmirror.testing.puppet` on first use."""
    if name in __all__:
        from hmmirror.testing import puppet

        return getattr(puppet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
