"""Frame tokens: what an agent without physical frames finds in an entry's PFN field.

Physical frame numbers help rowhammer and cache side channels, which is why
Linux hides them from unprivileged readers of ``/proc/PID/pagemap`` (4.2 on).
hmmd reads them, and must: a changed PFN is how it sees a page replaced. It
keeps them to itself. An agent that is neither root over ipc nor granted
``frames = "physical"`` gets, in the PFN field (bits 0..52) of every entry,
the page's frame token ``F(pfn)``; the flag and order bits are left as they
were. hmmd swaps PFNs for tokens only at the wire (``tokenize`` on the way
out, ``physical`` on the way in): every table inside it stays physical.

``F`` is a keyed permutation of the field, with keys drawn from ``os.urandom``
when hmmd starts: a new epoch, a new ``F``. It permutes the low 32 bits of the
field (physical addresses below 16 TiB, which is every page of nearly every
machine) and leaves bits 32..52 as they are. On the low 32 bits it is::

    x = xorshift16(x * M1) ^ K1
    x = xorshift16(x * M2) ^ K2
    x = (x * M3) ^ Kf                    (all modulo 2**32)

with random odd multipliers ``M1..M3``, random keys ``K1, K2``, and ``Kf``
the constant that makes ``F(0) = 0``. Each step is a bijection of [0, 2**32):

- ``x * M`` with ``M`` odd: odd numbers are units modulo a power of two
  (numpy's uint32 multiply wraps exactly so);
- ``xorshift16(x) = x ^ (x >> 16)``: the top half is unchanged and the bottom
  half is recovered by xoring again (the step is its own inverse);
- ``x ^ K``: its own inverse too.

A composition of bijections is a bijection, and the untouched high bits keep
it one on the whole field: two entries carry equal tokens exactly when they
name the same physical page. A PFN field of 0 (hmmd cannot see PFNs) stays 0,
and a real PFN never becomes 0.

What an agent learns from tokens is equality, within one epoch: whether two
entries (in its mirrors, sessions and processes) name one page, and whether a
page was replaced (COW, migration, compaction, KSM), which it would see as a
changed PFN or an INVALIDATE anyway; plus bits 32..52 of the PFN, which say
only which 16 TiB of physical address space a page lies in (0 below 16 TiB).
Multiplies carry upwards, xorshifts fold the top half down, so every bit of a
token depends on every bit of the PFN; neither a PFN's value, nor its low bits
(cache colour, DRAM bank), nor the distance between two pages can be read off
tokens without the 157 bits of keys. Why three multiplies: the attacker's best
material is a THP's 512 consecutive PFNs. With two, the lowest bit of
``xorshift16(token)`` (anyone can undo a public xorshift, which is also why F
does not end with one) is bit 0 of the PFN xor bit 16 of ``PFN * M1``: 16 key
bits, found by exhaustive search, and the rest follows bit by bit. With three,
that bit already depends on all of ``M1`` and on the low bits of ``M2`` and
``K1`` at once. This is a keyed mixer, not a cipher with a security proof: its
strength rests on the keys staying inside hmmd (never logged, never sent) and
on being drawn anew at every start.

Cost: the mixing runs on uint32 copies of the low halves, a chunk at a time
so that they stay in cache: ten numpy passes over 4 bytes an entry, plus one
to gather the low halves and one to put them back; for a 1 GiB fault (262 144
entries) a few hundred microseconds, measured against physical frames by
``bench/bench_fault.py``.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
from typing import Final

import numpy as np
from hmmirror.proto.entries import HMM_PFN_PFN_MASK, Entries

#: Multiplies (and so rounds); the rounds but the last end in a xorshift and a key.
ROUNDS: Final = 3
#: Entries per pass: the chunk (512 KiB), its uint32 state and scratch (2 x 256 KiB) stay in L2;
#: fewer, larger passes would pay less per-call overhead but spill.
CHUNK: Final = 65536
#: Arrays this long (256 MiB of mirror) are tokenized on several threads at once.
PARALLEL_FROM: Final = 65536
#: Helper threads beside the caller's (none on a one-CPU machine).
_THREADS: Final = max(0, min(3, (os.cpu_count() or 1) - 1))
_HELPERS: Final = (
    concurrent.futures.ThreadPoolExecutor(_THREADS, thread_name_prefix="frame-tokens")
    if _THREADS
    else None
)
#: Which uint32 of a native u64 holds its low half.
_LOW: Final = 0 if sys.byteorder == "little" else 1
_LOW_MASK: Final = 0xFFFF_FFFF
_SHIFT = np.uint32(16)
#: Bytes of secret: a multiplier per round, a key per round but the last (4 bytes each).
SECRET_BYTES: Final = 4 * (2 * ROUNDS - 1)


class FrameTokens:
    """One epoch's frame tokens: ``tokenize`` entries going out, ``physical`` ones coming in."""

    def __init__(self, secret: bytes | None = None) -> None:
        """Draw the keys (``secret``: SECRET_BYTES bytes, for tests; else os.urandom)."""
        raw = os.urandom(SECRET_BYTES) if secret is None else secret
        if len(raw) != SECRET_BYTES:
            raise ValueError(f"a frame-token secret has {SECRET_BYTES} bytes, not {len(raw)}")
        words = [int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4)]
        mults = [w | 1 for w in words[:ROUNDS]]
        self._mults = [np.uint32(m) for m in mults]
        self._inverse_mults = [np.uint32(pow(m, -1, 1 << 32)) for m in mults]
        # Round i < ROUNDS - 1 ends in key i; the last key is F'(0), so that F(0) = 0.
        self._keys = [np.uint32(k) for k in [*words[ROUNDS:], 0]]
        self._keys[-1] = np.uint32(self._low_token(0))

    def _mix(self, state: np.ndarray, scratch: np.ndarray) -> None:
        """F on the uint32 ``state``, in place (``scratch`` alike, for the xorshifts)."""
        last = ROUNDS - 1
        for i in range(ROUNDS):
            np.multiply(state, self._mults[i], out=state)
            if i < last:
                np.right_shift(state, _SHIFT, out=scratch)
                np.bitwise_xor(state, scratch, out=state)
            np.bitwise_xor(state, self._keys[i], out=state)

    def _unmix(self, state: np.ndarray, scratch: np.ndarray) -> None:
        """F's inverse on the uint32 ``state``, in place."""
        last = ROUNDS - 1
        for i in reversed(range(ROUNDS)):
            np.bitwise_xor(state, self._keys[i], out=state)
            if i < last:
                np.right_shift(state, _SHIFT, out=scratch)
                np.bitwise_xor(state, scratch, out=state)
            np.multiply(state, self._inverse_mults[i], out=state)

    def _low_token(self, low: int) -> int:
        """F of one 32-bit value, through the vector path."""
        state = np.array([low], dtype=np.uint32)
        self._mix(state, np.empty_like(state))
        return int(state[0])

    def token(self, pfn: int) -> int:
        """The token of one PFN (0 stays 0)."""
        pfn &= HMM_PFN_PFN_MASK
        return (pfn & ~_LOW_MASK) | self._low_token(pfn & _LOW_MASK)

    def tokenize(self, entries: Entries) -> None:
        """Replace, in place, the PFN field of every entry by its token; flags stay.

        ``entries`` is a writable, contiguous native u64 array: only the low
        half of each entry changes. A large array (a whole fault of up to 1 GiB)
        is done in slices on several threads at once: numpy lets go of the GIL.
        """
        n = len(entries)
        if n == 0:
            return
        if entries.dtype != np.uint64 or not entries.flags.c_contiguous:
            raise ValueError("tokenize needs a contiguous native uint64 array")
        low = entries.view(np.uint32)[_LOW::2]
        if n < PARALLEL_FROM or _HELPERS is None:
            self._tokenize_slice(entries, low, 0, n)
            return
        parts = _THREADS + 1
        step = -(-n // parts)
        bounds = [(a, min(n, a + step)) for a in range(0, n, step)]
        pending = [_HELPERS.submit(self._tokenize_slice, entries, low, a, b) for a, b in bounds[1:]]
        self._tokenize_slice(entries, low, *bounds[0])
        for future in pending:
            future.result()

    def _tokenize_slice(self, entries: Entries, low: np.ndarray, start: int, end: int) -> None:
        """``tokenize`` of entries[start:end], chunk by chunk (buffers of its own)."""
        state = np.empty(min(end - start, CHUNK), dtype=np.uint32)
        scratch = np.empty_like(state)
        for a in range(start, end, CHUNK):
            b = min(end, a + CHUNK)
            s, t = state[: b - a], scratch[: b - a]
            # Truncating the contiguous u64s is cheaper than reading the strided low halves.
            np.copyto(s, entries[a:b], casting="unsafe")
            self._mix(s, t)
            np.copyto(low[a:b], s)

    def physical(self, entries: Entries) -> Entries:
        """A copy of ``entries`` (tokens, as an agent sends them) with PFNs in the PFN field."""
        out = np.array(entries, dtype=np.uint64)
        low = out.view(np.uint32)[_LOW::2]
        state = low.copy()
        self._unmix(state, np.empty_like(state))
        np.copyto(low, state)
        return out
