"""Thin, typed wrappers over the Linux interfaces hmmd watches processes with.

``procfs`` reads maps, pagemap and process identity; ``vm`` moves data with
process_vm_readv/writev; ``scan`` drives the PAGEMAP_SCAN ioctl. Nothing here
knows about mirrors or the protocol.
"""
