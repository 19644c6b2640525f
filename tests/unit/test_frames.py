"""Frame tokens (hmmd's ``frames``): a keyed bijection of the PFN field that keeps the flags."""

from __future__ import annotations

import numpy as np
import pytest
from hmmirror.daemon.frames import CHUNK, SECRET_BYTES, FrameTokens
from hmmirror.proto.entries import (
    HMM_PFN_ERROR,
    HMM_PFN_FLAGS,
    HMM_PFN_ORDER_MASK,
    HMM_PFN_PFN_MASK,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
)
from hypothesis import given, settings
from hypothesis import strategies as st

FIELD = np.uint64(HMM_PFN_PFN_MASK)
FLAGS = HMM_PFN_FLAGS | HMM_PFN_ORDER_MASK
U64 = st.integers(0, 2**64 - 1)


def tokens_of(frames: FrameTokens, entries: list[int]) -> np.ndarray:
    """``entries`` tokenized (a copy)."""
    table = np.array(entries, dtype=np.uint64)
    frames.tokenize(table)
    return table


@settings(max_examples=200)
@given(
    st.lists(U64, min_size=1, max_size=300), st.binary(min_size=SECRET_BYTES, max_size=SECRET_BYTES)
)
def test_flags_stay_and_physical_undoes_tokenize(entries: list[int], secret: bytes) -> None:
    frames = FrameTokens(secret)
    tokens = tokens_of(frames, entries)
    for before, after in zip(entries, tokens.tolist(), strict=True):
        assert after & FLAGS == before & FLAGS
        assert after & HMM_PFN_PFN_MASK == frames.token(before & HMM_PFN_PFN_MASK)
    assert frames.physical(tokens).tolist() == entries


@given(st.integers(0, HMM_PFN_PFN_MASK), st.integers(0, HMM_PFN_PFN_MASK))
def test_equal_tokens_exactly_for_equal_frames(a: int, b: int) -> None:
    frames = FrameTokens()
    assert (frames.token(a) == frames.token(b)) == (a == b)
    assert 0 <= frames.token(a) <= HMM_PFN_PFN_MASK


def test_the_low_32_bits_are_permuted_and_zero_stays_zero() -> None:
    """Every one of 2**20 consecutive PFNs gets its own token (a bijection shows no
    collision), none keeps its value, and 0 (no frame) stays 0."""
    frames = FrameTokens()
    pfns = np.arange(1, 1 << 20, dtype=np.uint64) + np.uint64(0x12_0000)
    table = pfns | np.uint64(HMM_PFN_VALID | HMM_PFN_WRITE)
    frames.tokenize(table)
    got = table & FIELD
    assert len(np.unique(got)) == len(pfns)
    assert not (got == pfns).any()
    assert frames.token(0) == 0
    assert tokens_of(frames, [HMM_PFN_ERROR]).tolist() == [HMM_PFN_ERROR]
    # Bits 32..52 (16 TiB and up) pass through; the low half is permuted.
    high = 0x1F_0000_0000_0000 | 0x1234
    assert frames.token(high) >> 32 == high >> 32
    assert frames.token(high) & 0xFFFF_FFFF == frames.token(0x1234)


def test_the_low_bits_of_a_token_do_not_follow_the_pfn() -> None:
    """Consecutive PFNs (a THP's 512 pages) get tokens whose low bits look unrelated: no bit
    of the token is constant or equal to a bit of the PFN across the run."""
    frames = FrameTokens()
    pfns = np.arange(0x40000, 0x40000 + 512, dtype=np.uint64)
    table = pfns.copy()
    frames.tokenize(table)
    for bit in range(32):
        column = (table >> np.uint64(bit)) & np.uint64(1)
        assert 128 < int(column.sum()) < 384, f"token bit {bit} is biased over a THP"
        same = int(((pfns >> np.uint64(bit)) & np.uint64(1) == column).sum())
        assert 128 < same < 384, f"token bit {bit} follows PFN bit {bit}"


def test_each_epoch_draws_its_own_keys() -> None:
    pfns = list(range(1000, 1064))
    a, b = tokens_of(FrameTokens(), pfns), tokens_of(FrameTokens(), pfns)
    assert (a != b).sum() > 60


def test_chunks_and_slices_agree() -> None:
    """Tokenizing across chunk boundaries, or in pieces, gives the same tokens."""
    frames = FrameTokens()
    entries = np.arange(3 * CHUNK + 17, dtype=np.uint64) * np.uint64(7919) | np.uint64(
        HMM_PFN_VALID
    )
    whole = entries.copy()
    frames.tokenize(whole)
    pieces = entries.copy()
    for a in range(0, len(pieces), 1000):
        frames.tokenize(pieces[a : a + 1000])
    assert (whole == pieces).all()
    assert [frames.token(int(x) & HMM_PFN_PFN_MASK) for x in entries[-3:]] == (
        (whole[-3:] & FIELD).tolist()
    )


def test_refuses_a_bad_secret_or_a_strided_table() -> None:
    with pytest.raises(ValueError, match="secret"):
        FrameTokens(b"short")
    with pytest.raises(ValueError, match="contiguous"):
        FrameTokens().tokenize(np.zeros(8, dtype=np.uint64)[::2])
