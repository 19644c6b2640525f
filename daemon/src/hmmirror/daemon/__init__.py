"""hmmd, the hmmirror host daemon.

It watches the memory of live processes, serves FAULT and DMA requests from
mirroring agents, and sends them synchronous, sequence-numbered invalidations.
Run it with ``hmmd run`` (see ``hmmd --help``).
"""

#: The installed distribution, whose version (the repository's VERSION file is its one
#: source) is read when asked (``version``), not at every start.
DISTRIBUTION = "hmmirror-daemon"
__all__ = ["DISTRIBUTION", "version"]


def version() -> str:
    """hmmd's version."""
    # Imported here: every program of the package imports this one (the injector's helper
    # too, whose start hmmd waits for), and the transport package is most of a start.
    from hmmirror.transport.settings import distribution_version

    return distribution_version(DISTRIBUTION)


def __getattr__(name: str) -> str:
    """``hmmirror.daemon.__version__``, read on first use."""
    if name == "__version__":
        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
