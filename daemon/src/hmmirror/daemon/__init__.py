"""hmmd, the hmmirror host daemon.

It watches the memory of live processes, serves FAULT and DMA requests from
mirroring agents, and sends them synchronous, sequence-numbered invalidations.
Run it with ``hmmd run`` (see ``hmmd --help``).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
