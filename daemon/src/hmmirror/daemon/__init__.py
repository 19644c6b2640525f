"""hmmd, the hmmirror host daemon.

It watches the memory of live processes, serves FAULT and DMA requests from
mirroring agents, and sends them synchronous, sequence-numbered invalidations.
Run it with ``hmmd run`` (see ``hmmd --help``).
"""

from importlib.metadata import version

#: The installed distribution's version: the repository's VERSION file is its one source.
__version__ = version("hmmirror-daemon")
__all__ = ["__version__"]
