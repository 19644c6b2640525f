"""The data oracle and the target's munmap holes (``check.stamps.HOLE``).

A page the target munmapped is a hole its own process's next mapping may take (its
allocator's, a library's): a READ or WRITE at it then lands in that mapping, as HMM says it
must. Two CI runs of an honest ``hmmctl check`` were judged wrong that way ("write landed on
an unmapped page", "read a value never live ... got zero"). A PROT_NONE page is the
target's own and no mapping can take it: a WRITE that landed there is still a violation.
"""

from __future__ import annotations

import numpy as np
from hmmirror.tools.check.stamps import (
    HOLE,
    PAGE,
    READ,
    RECORD,
    SET,
    UNMAPPED,
    WRITE,
    ZERO,
    DataOracle,
    record,
    stamp,
)

BASE = 0x7F0000000000
HOLE_PAGE, NONE_PAGE = BASE, BASE + PAGE


def log(*records: bytes) -> np.ndarray:
    return np.frombuffer(b"".join(records), dtype=RECORD)


def judge(hole_flag: int) -> list[str]:
    target = log(
        record(200, 201, HOLE_PAGE, SET, ZERO),
        record(300, 301, HOLE_PAGE, SET, UNMAPPED, hole_flag),
        record(200, 201, NONE_PAGE, SET, ZERO),
        record(300, 301, NONE_PAGE, SET, UNMAPPED),
    )  # fmt: skip
    value = stamp(0xA0, 0, 0, 1)
    dma = log(
        record(400, 410, HOLE_PAGE, WRITE, value), record(420, 430, HOLE_PAGE, READ, ZERO),
        record(400, 410, NONE_PAGE, WRITE, value), record(420, 430, NONE_PAGE, READ, ZERO),
    )  # fmt: skip
    oracle = DataOracle(BASE, 2, 100)
    oracle.feed(target, [dma])
    return sorted(f"{v.kind} {v.addr:#x}" for v in oracle.judge([dma]))


def test_a_hole_the_target_left_may_show_anything_and_take_a_write():
    assert judge(HOLE) == [
        f"read a value never live {NONE_PAGE:#x}",
        f"write landed on an unmapped page {NONE_PAGE:#x}",
    ]


def test_without_the_hole_flag_both_pages_are_judged_unmapped():
    """What the oracle said of every munmap before the flag, and still says of PROT_NONE."""
    assert judge(0) == sorted(
        f"{kind} {addr:#x}"
        for kind in ("read a value never live", "write landed on an unmapped page")
        for addr in (HOLE_PAGE, NONE_PAGE)
    )
