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
machine) and leaves bits 32..52 as they are. On the low 32 bits it is
``ROUNDS`` rounds of ``x = xorshift16(x * M_i mod 2**32) ^ K_i``, each step a
bijection of [0, 2**32):

- ``x * M mod 2**32`` with ``M`` odd: odd numbers are units modulo a power
  of two (numpy's uint32 multiply wraps exactly so);
- ``x ^ (x >> 16)``: the top half is unchanged and the bottom half is
  recovered by xoring it again (the step is its own inverse);
- ``x ^ K``: its own inverse too.

A composition of bijections is a bijection, and the untouched high bits keep
it one on the whole field: two entries carry equal tokens exactly when they
name the same physical page. The multipliers and all but the last key are
random; the last key is the one that makes ``F(0) = 0``, so a PFN field of 0
(hmmd cannot see PFNs) stays 0 and a real PFN never becomes 0.

What an agent learns from tokens is equality, within one epoch: whether two
entries (in its mirrors, sessions and processes) name one page, and whether a
page was replaced (COW, migration, compaction, KSM), which it would see as a
changed PFN or an INVALIDATE anyway; plus bits 32..52 of the PFN, which say
only which 16 TiB of physical address space a page lies in (0 below 16 TiB).
Carries make the multiply non-linear over GF(2) and the xorshift non-linear
modulo 2**32; from the second round on, every bit of the result depends on
every bit of the PFN, so neither a PFN's value, nor its low bits (cache
colour, DRAM bank), nor the distance between two pages can be read off the
tokens without the keys (``ROUNDS * 64`` bits, less the derived last key).
This is a keyed mixer, not a cipher with a security proof: its strength rests
on the keys staying inside hmmd (never logged, never sent) and on being drawn
anew at every start.

Cost: the mixing runs on uint32 copies of the low halves, a chunk at a time
so that they stay in cache; for a 1 GiB fault (262 144 entries) that is a few
hundred microseconds, measured against physical frames by
``bench/bench_fault.py``.
"""

from __future__ import annotations

import os
import sys
from typing import Final

import numpy as np
from hmmirror.proto.entries import HMM_PFN_PFN_MASK, Entries

ROUNDS: Final = 3
#: Entries per pass: the uint32 state and its scratch (2 x 128 KiB) stay in L2.
CHUNK: Final = 32768
#: Which uint32 of a native u64 holds its low half.
_LOW: Final = 0 if sys.byteorder == "little" else 1
_LOW_MASK: Final = 0xFFFF_FFFF
_SHIFT = np.uint32(16)


class FrameTokens:
    """One epoch's frame tokens: ``tokenize`` entries going out, ``physical`` ones coming in."""

    def __init__(self, secret: bytes | None = None) -> None:
        """Draw the keys (``secret``: 8 * ROUNDS bytes, for tests; else os.urandom)."""
        raw = os.urandom(8 * ROUNDS) if secret is None else secret
        if len(raw) != 8 * ROUNDS:
            raise ValueError(f"a frame-token secret has {8 * ROUNDS} bytes, not {len(raw)}")
        words = [int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4)]
        mults = [w | 1 for w in words[0::2]]
        keys = list(words[1::2])
        keys[-1] = 0
        self._mults = [np.uint32(m) for m in mults]
        self._keys = [np.uint32(k) for k in keys]
        self._keys[-1] = np.uint32(self._low_token(0))  # so that F(0) = 0
        self._inverse_mults = [np.uint32(pow(m, -1, 1 << 32)) for m in mults]

    def _mix(self, state: np.ndarray, scratch: np.ndarray) -> None:
        """Every round but the first multiply, in place on uint32 ``state``."""
        for i in range(ROUNDS):
            if i:
                np.multiply(state, self._mults[i], out=state)
            np.right_shift(state, _SHIFT, out=scratch)
            np.bitwise_xor(state, scratch, out=state)
            np.bitwise_xor(state, self._keys[i], out=state)

    def _low_token(self, low: int) -> int:
        """The permutation of the low 32 bits, for one value, through the vector path."""
        state = np.array([low], dtype=np.uint32)
        np.multiply(state, self._mults[0], out=state)
        self._mix(state, np.empty_like(state))
        return int(state[0])

    def token(self, pfn: int) -> int:
        """The token of one PFN (0 stays 0)."""
        pfn &= HMM_PFN_PFN_MASK
        return (pfn & ~_LOW_MASK) | self._low_token(pfn & _LOW_MASK)

    def tokenize(self, entries: Entries) -> None:
        """Replace, in place, the PFN field of every entry by its token; flags stay.

        ``entries`` is a writable, contiguous native u64 array: only the low
        half of each entry changes.
        """
        n = len(entries)
        if n == 0:
            return
        if entries.dtype != np.uint64 or not entries.flags.c_contiguous:
            raise ValueError("tokenize needs a contiguous native uint64 array")
        low = entries.view(np.uint32)[_LOW::2]
        state = np.empty(min(n, CHUNK), dtype=np.uint32)
        scratch = np.empty_like(state)
        for a in range(0, n, CHUNK):
            part = low[a : a + CHUNK]
            s, t = state[: len(part)], scratch[: len(part)]
            # Truncating the contiguous u64s is cheaper than reading the strided low halves.
            np.copyto(s, entries[a : a + CHUNK], casting="unsafe")
            np.multiply(s, self._mults[0], out=s)
            self._mix(s, t)
            np.copyto(part, s)

    def physical(self, entries: Entries) -> Entries:
        """A copy of ``entries`` (tokens, as an agent sends them) with PFNs in the PFN field."""
        out = np.array(entries, dtype=np.uint64)
        low = out.view(np.uint32)[_LOW::2]
        state = low.copy()
        scratch = np.empty_like(state)
        for i in reversed(range(ROUNDS)):
            np.bitwise_xor(state, self._keys[i], out=state)
            np.right_shift(state, _SHIFT, out=scratch)
            np.bitwise_xor(state, scratch, out=state)
            np.multiply(state, self._inverse_mults[i], out=state)
        np.copyto(low, state)
        return out
