"""DMA service: device reads and writes of a target's memory, never through a stale translation."""
