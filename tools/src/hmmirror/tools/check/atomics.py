"""The atomic oracle: every FETCH_ADD and COMPARE_SWAP result an agent logged must be possible.

The word at offset 8 of each page is a counter: agents only FETCH_ADD 1 to it
or COMPARE_SWAP v for v + 1 (``stamps`` lists what else may change it: the
target's mapping changes of the page). hmmd runs one target's atomics one at
a time, so between two changes of the page's mapping the increments that land
return 0 (or the counter the page came with), 1, 2, ... in the order they ran.

The target's changes of a page (ZERO, UNMAPPED, MOVE and FREE, the last until
the page is next certainly written) each happened at one unknown instant of
their window; overlapping windows merge into one block. An atomic whose whole
flight [t0, t1] lies between two blocks certainly ran in that *segment*, and
is judged there. In one segment:

- two increments never return the same value;
- an op that ended before another began returned less (an increment) or no
  more (a failed CAS, which only reads) than the later one;
- after a block of mappings that zero the page (no MOVE, no FREE), an op's old
  value is at least the increments of the segment certainly done before it, and
  at most the increments that may have run between the block's last possible
  zeroing and the op's end, counting intents with no outcome (an agent killed,
  or one whose atomic timed out, may have had it applied) as possible at any
  time after they were sent.

Each rule holds for every order the windows allow, so an honest run never
breaks one; an op straddling a block is not judged, only counted as possible.

A straddling increment may also *carry* its value across the block. hmmd runs
an atomic as a ``process_vm_readv`` of the word and a ``process_vm_writev`` of
the result (``daemon.dma.service``), and the target's mapping change may fall
between the two: the old page's value v is read, and v + 1 lands on the page
that replaced it, just as a DMA write checked before its copy lands on a page
replaced in between (README, "Honest limits of observation mode"). So after
a block the counter starts at 0 or at v + 1 for some increment whose flight
overlapped the block's zeroing: the upper bound adds the largest such v. An
intent with no outcome sent before the block ends may have carried anything,
so a segment after one gets no upper bound (the other rules still hold).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from hmmirror.tools.check.stamps import (
    ATOMIC_INTENT,
    CAS_FAIL,
    CAS_OK,
    FADD,
    FOREVER,
    FREE,
    MOVE,
    PAGE,
    SET,
    UNMAPPED,
    WRITE,
    ZERO,
)

_OUTCOMES = (FADD, CAS_OK, CAS_FAIL)
_INCREMENTS = (FADD, CAS_OK)


@dataclass(frozen=True)
class AtomicViolation:
    """An atomic whose logged result no order of the logged changes explains."""

    addr: int
    kind: str
    detail: str


@dataclass
class _Op:
    t0: int
    t1: int
    old: int
    kind: int
    token: int

    @property
    def inc(self) -> int:
        """1 if the op incremented the word, else 0 (a failed CAS only read it)."""
        return int(self.kind in _INCREMENTS)


@dataclass
class _Block:
    """Merged windows of the target's changes of one page."""

    e0: int
    e1: int
    zeroes: bool = True
    """Every change in it zeroes the page or unmaps it: the counter restarts at 0."""
    zero_from: int = 0
    """The earliest instant the last zeroing of the block may have happened."""


@dataclass
class _PageLog:
    events: list[tuple[int, int, int]] = field(default_factory=list)  # e0, e1, kind
    stores: list[tuple[int, int]] = field(default_factory=list)  # certain writes: t0, t1
    ops: list[_Op] = field(default_factory=list)
    open: list[int] = field(default_factory=list)  # t0 of intents with no outcome


_NAMES = {FADD: "FETCH_ADD", CAS_OK: "CAS (swapped)", CAS_FAIL: "CAS (failed)"}


def _describe(op: _Op) -> str:
    """An op in words, for violation reports."""
    return (
        f"{_NAMES[op.kind]} of agent {op.token >> 48} over [{op.t0}, {op.t1}] ns returned {op.old}"
    )


class AtomicOracle:
    """Judges the agents' atomics against the target's log and each other."""

    def __init__(self, base: int, npages: int, t_start: int) -> None:
        self.base = base
        self.npages = npages
        self.t_start = t_start
        self.judged = 0
        """Atomics judged (whose flight lay wholly inside one segment)."""
        self.logged = 0
        """Atomics with an outcome in the logs."""

    def _collect(
        self, target_log: npt.NDArray[np.void], dma_logs: Iterable[npt.NDArray[np.void]]
    ) -> dict[int, _PageLog]:
        pages: dict[int, _PageLog] = defaultdict(_PageLog)
        lo, hi = self.base, self.base + self.npages * PAGE
        for i in range(self.npages):  # the arena starts reserved PROT_NONE
            pages[lo + i * PAGE].events.append((0, self.t_start, SET))
        for t0, t1, addr, kind, value, _ in target_log.tolist():
            if not lo <= addr < hi:
                continue
            if kind == SET and value not in (ZERO, UNMAPPED):
                pages[addr].stores.append((t0, t1))  # a store at offset 0: the page is dirty
            else:
                pages[addr].events.append((t0, t1, FREE if kind == FREE else
                                           MOVE if kind == MOVE else SET))  # fmt: skip
        intents: dict[int, tuple[int, int]] = {}
        done: set[int] = set()
        for log in dma_logs:
            for t0, t1, addr, kind, value, extra in log.tolist():
                if kind == WRITE:
                    pages[addr].stores.append((t0, t1))
                elif kind == ATOMIC_INTENT:
                    intents[extra] = (addr, t0)
                elif kind > ATOMIC_INTENT:
                    done.add(extra)
                    if kind in _OUTCOMES:
                        self.logged += 1
                        pages[addr].ops.append(_Op(t0, t1, value, kind, extra))
                        if kind in _INCREMENTS:
                            pages[addr].stores.append((t0, t1))
        for token, (addr, t0) in intents.items():
            if token not in done:
                pages[addr].open.append(t0)
        return pages

    @staticmethod
    def _blocks(page: _PageLog) -> list[_Block]:
        """The page's changes, FREE stretched to the next certain write, merged."""
        stores = sorted(page.stores)
        starts = [t0 for t0, _ in stores]
        # Suffix minimum of the stores' ends: the first certain write after an instant.
        ends = [t1 for _, t1 in stores] + [FOREVER]
        for i in range(len(stores) - 1, -1, -1):
            ends[i] = min(ends[i], ends[i + 1])
        windows = []
        for e0, e1, kind in page.events:
            if kind == FREE:  # lazily freed (zeroed) any time until the page is written
                e1 = max(e1, ends[bisect_left(starts, e1 + 1)])
            windows.append((e0, e1, kind))
        windows.sort()
        blocks: list[_Block] = []
        for e0, e1, kind in windows:
            if blocks and e0 <= blocks[-1].e1:
                b = blocks[-1]
                b.e1 = max(b.e1, e1)
            else:
                b = _Block(e0, e1)
                blocks.append(b)
            b.zeroes = b.zeroes and kind == SET
            b.zero_from = max(b.zero_from, e0)
        return blocks

    def judge(
        self, target_log: npt.NDArray[np.void], dma_logs: Iterable[npt.NDArray[np.void]]
    ) -> list[AtomicViolation]:
        """Every atomic result that breaks a rule of the module docstring."""
        found: list[AtomicViolation] = []
        for addr, page in sorted(self._collect(target_log, dma_logs).items()):
            if page.ops:
                found += self._judge_page(addr, page)
        return found

    def _judge_page(self, addr: int, page: _PageLog) -> list[AtomicViolation]:
        blocks = self._blocks(page)
        ends = [b.e1 for b in blocks]
        segments: dict[int, list[_Op]] = defaultdict(list)
        for op in page.ops:
            i = bisect_left(ends, op.t0) - 1  # the last block certainly over before op began
            if i >= 0 and (i + 1 == len(blocks) or op.t1 < blocks[i + 1].e0):
                segments[i].append(op)
        # Every increment that may have happened, for the upper bound: t0 and t1.
        inc = [(op.t0, op.t1) for op in page.ops if op.inc] + [(t, FOREVER) for t in page.open]
        inc_t0 = np.array([t for t, _ in inc], dtype=np.uint64)
        inc_t1 = np.array([t for _, t in inc], dtype=np.uint64)
        found: list[AtomicViolation] = []
        for i, ops in sorted(segments.items()):
            self.judged += len(ops)
            carry = self._carry(page, blocks[i])
            found += self._judge_segment(addr, blocks[i], ops, inc_t0, inc_t1, carry)
        return found

    @staticmethod
    def _carry(page: _PageLog, block: _Block) -> int | None:
        """The most an increment in flight across ``block``'s last zeroing may have left
        on the new page past its own increment (its old value; see the module docstring),
        or None when an intent with no outcome was sent before the block ended."""
        if any(t0 < block.e1 for t0 in page.open):
            return None
        straddling = (
            op.old for op in page.ops if op.inc and op.t0 < block.e1 and op.t1 > block.zero_from
        )
        return max(straddling, default=0)

    def _judge_segment(
        self,
        addr: int,
        block: _Block,
        ops: list[_Op],
        inc_t0: npt.NDArray[np.uint64],
        inc_t1: npt.NDArray[np.uint64],
        carry: int | None,
    ) -> list[AtomicViolation]:
        found: list[AtomicViolation] = []
        flagged: set[int] = set()
        by_end = sorted(ops, key=lambda o: o.t1)
        t1s = [o.t1 for o in by_end]
        # best[k]: of by_end[:k + 1], the op that forces the highest value on any later op.
        best: list[_Op] = []
        incs_before = [0]
        for o in by_end:
            if not best or o.old + o.inc > best[-1].old + best[-1].inc:
                best.append(o)
            else:
                best.append(best[-1])
            incs_before.append(incs_before[-1] + o.inc)
        for n, o in enumerate(ops):
            k = bisect_left(t1s, o.t0)  # by_end[:k] certainly ended before o began
            if k and best[k - 1].old + best[k - 1].inc > o.old:
                flagged.add(n)
                found.append(AtomicViolation(addr, "went back", (
                    f"{_describe(o)} at {addr + 8:#x}, after {_describe(best[k - 1])}"
                )))  # fmt: skip
                continue
            if not block.zeroes:
                continue
            if o.old < incs_before[k]:
                flagged.add(n)
                found.append(AtomicViolation(addr, "too low", (
                    f"{_describe(o)} at {addr + 8:#x} after {incs_before[k]} certain "
                    f"increments since the page was zeroed"
                )))  # fmt: skip
                continue
            if carry is None:
                continue
            may = int(np.count_nonzero((inc_t0 < o.t1) & (inc_t1 > block.zero_from))) - o.inc
            may += carry
            if o.old > may:
                flagged.add(n)
                found.append(AtomicViolation(addr, "too high", (
                    f"{_describe(o)} at {addr + 8:#x}, but at most {may} increments may "
                    f"have run since the page was zeroed (or been carried across it)"
                )))  # fmt: skip
        seen: dict[int, _Op] = {}
        for n, o in enumerate(ops):
            if not o.inc or n in flagged:
                continue
            twin = seen.setdefault(o.old, o)
            if twin is not o:
                found.append(AtomicViolation(addr, "same value twice", (
                    f"{_describe(o)} at {addr + 8:#x}, and so did {_describe(twin)}"
                )))  # fmt: skip
        return found
