"""The memory system calls that target programs make, bound once through ctypes.

The demo's churning target, the checker's target and the soak benchmark's
target all change their own mappings with real mmap, mremap, munmap,
mprotect and madvise calls. They share these bindings (argument and result
types set, errno kept) and the flag values, which the ``mmap`` module does
not export.
"""

from __future__ import annotations

import ctypes
import os

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x10, 0x20, 0x100000
MADV_DONTNEED, MADV_FREE, MADV_NOHUGEPAGE = 4, 8, 15
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
#: What mmap and mremap return on failure.
MAP_FAILED = ctypes.c_void_p(-1).value

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def check(ret: int, what: str) -> None:
    """Raise OSError (with errno) if the libc call ``what`` returned nonzero."""
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
