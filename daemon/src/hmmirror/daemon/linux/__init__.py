"""Thin, typed wrappers over the Linux interfaces hmmd watches processes with.

``procfs`` reads maps, pagemap and process identity; ``vm`` moves data with
process_vm_readv/writev; ``scan`` drives the PAGEMAP_SCAN ioctl; ``userfaultfd``
is the syscall layer of a target's uffd (the watcher over it is ``watch.uffd``);
``inject`` creates a uffd inside a target with ptrace, or breaks COW there, and
``injector`` runs those injections in a helper process that outlives hmmd; ``creds`` reads who a
process is. Nothing here knows about mirrors or the protocol.
"""
