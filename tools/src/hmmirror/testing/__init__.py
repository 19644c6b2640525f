"""Test helpers for hmmirror users: a real target process driven from asyncio.

:class:`~hmmirror.testing.puppet.Puppet` starts ``python -m hmmirror.testing.puppet``,
a process that really mmaps, writes, forks and exits on command, so that a daemon
watching it sees genuine kernel state (``/proc/PID/maps``, pagemap, userfaultfd).

The names are imported lazily: ``python -m hmmirror.testing.puppet`` imports this
package first, and an eager import of the submodule it is about to run would make
``runpy`` warn about a module found in ``sys.modules`` before execution.
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
