"""process_vm_readv/writev through ctypes, batching page runs into one call.

These are the device accesses: they fault pages in, honour VMA permissions
(EFAULT for an unreadable page, EFAULT for a write to a read-only page), and
never bypass them the way ``/proc/PID/mem`` can.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

import numpy as np

Buffer = bytes | bytearray | memoryview

_libc = ctypes.CDLL(None, use_errno=True)
IOV_MAX = 1024


class _Iovec(ctypes.Structure):
    """``struct iovec``: one (base, length) run for process_vm_readv/writev."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.restype = ctypes.c_ssize_t
for _fn in (_libc.process_vm_readv, _libc.process_vm_writev):
    _fn.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_Iovec),
        ctypes.c_ulong,
        ctypes.POINTER(_Iovec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]


def _address(buf: Buffer) -> int:
    """The address of ``buf``'s first byte."""
    # numpy gives the address of read-only buffers too (bytes, zmq frames).
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def _transfer(write: bool, pid: int, local: Buffer, remote: Sequence[tuple[int, int]]) -> int:
    """Move bytes between ``local`` and the (addr, len) ``remote`` runs; return bytes moved.

    Stops at the first short transfer, as the syscall does. Raises OSError
    with the syscall's errno when nothing could be moved at all.
    """
    base = _address(local)
    fn = _libc.process_vm_writev if write else _libc.process_vm_readv
    done = 0
    for i in range(0, len(remote), IOV_MAX):
        chunk = remote[i : i + IOV_MAX]
        total = sum(n for _, n in chunk)
        riov = (_Iovec * len(chunk))(*[_Iovec(a, n) for a, n in chunk])
        liov = _Iovec(base + done, total)
        n = fn(pid, ctypes.byref(liov), 1, riov, len(chunk), 0)
        if n < 0:
            err = ctypes.get_errno()
            if done:
                return done
            raise OSError(
                err, f"process_vm_{'writev' if write else 'readv'} pid {pid}: {os.strerror(err)}"
            )
        done += n
        if n < total:
            break
    return done


def read_into(pid: int, local: Buffer, remote: Sequence[tuple[int, int]]) -> int:
    """process_vm_readv the ``remote`` runs into ``local``; return bytes read."""
    return _transfer(False, pid, local, remote)


def write_from(pid: int, local: Buffer, remote: Sequence[tuple[int, int]]) -> int:
    """process_vm_writev ``local`` into the ``remote`` runs; return bytes written."""
    return _transfer(True, pid, local, remote)
