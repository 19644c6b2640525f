"""Page stamps, the change logs the target and the agents keep, and the data oracle.

Every page of the checked arena holds one 8-byte stamp at offset 0; offset 8
is the word agents run atomics on, and bytes 16..4096 stay zero. A stamp names
its writer, the mapping generation, the page index and a write version::

    bits 63..56  writer: 0x5A target, 0xA0 + n agent n, 0xC1 a fork child
    bits 55..40  mapping generation (target) or 0 (agents)
    bits 39..32  page index in the arena
    bits 31..0   write version

Logs are flat files of little-endian u64 records, stamped with
CLOCK_MONOTONIC nanoseconds (one clock for every process on the host):

``TARGET_LOG``  t0, t1, addr, kind, value, src  (kind SET, FREE or MOVE)
``DMA_LOG``     t0, t1, addr, kind, value, flags (kind READ, WRITE, WRITE_INTENT,
                WRITE_FAILED, or an atomic's record: see ``check.atomics``)

The data oracle: a DMA READ of a page, sent at ``s`` and answered at ``r``,
must return a value that was live at some moment in [s, r]. A change logged
over [t0, t1] happened at one unknown instant inside it, so a value is ruled
out only when a later change certainly began after it was written
(``t0' > t1``) and certainly ended before the read began (``t1' < s``). A
WRITE that hmmd performed found the page mapped at some instant of its
flight: one logged while the target's log says the page was certainly
unmapped throughout is a lie (the agent logged a refused write as landed).

What may change the atomic word (offset 8): only the agents' atomics (a
FETCH_ADD of 1, or a COMPARE_SWAP of v for v + 1, so it stays a counter), and
the target's mapping changes of its page: a new mapping (mmap, MAP_FIXED over
it) or MADV_DONTNEED zero it; munmap, PROT_NONE and mremap's source leave no
page; mremap moves it (the destination holds the source's counter); MADV_FREE
may zero it at any instant until the page is next written. The target's
stores and the agents' WRITEs touch offset 0 only (8 bytes), and a fork
child writes its own copies. ``check.atomics`` judges the atomics.

Refused writes. A WRITE_INTENT is logged before every WRITE is sent. If hmmd
refused it before copying anything the agent logs WRITE_FAILED and the intent
is closed: its value never landed. The agent's writes are 8 bytes inside one
page, so a copy is all or nothing, and these refusals prove nothing landed:
EPERM, EFAULT, EINVAL (a refusal at the fault or at hmmd's pre-copy checks, or
a copy that moved nothing), ENOENT and EACCES (the client's own checks), and
an EBUSY the client raised itself (every attempt was refused STALE, which for
such a copy means it moved nothing). The intent stays open, its value possible
from ``t0`` on for ever, where the write may have landed or may still land:
hmmd's own EBUSY (a copy past its deadline is abandoned, not stopped), ESRCH
(hmmd answers it when the mm closed after a finished copy), a timeout, a lost
daemon or session, an eviction, or an agent killed in flight.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

PAGE = 4096
#: The value of a page that is not mapped (or PROT_NONE): no read can return it.
UNMAPPED = (1 << 64) - 1
ZERO = 0
WRITER_TARGET = 0x5A
WRITER_CHILD = 0xC1
WRITER_AGENT = 0xA0

# Target log kinds.
SET = 0
"""The page now holds ``value``."""
FREE = 1
"""MADV_FREE: the page holds what it held, or zero, until it is next written."""
MOVE = 2
"""mremap: the page now holds what the page at ``src`` held."""
# DMA log kinds.
READ = 0
WRITE = 1
WRITE_INTENT = 3
"""Written straight to the log before a WRITE is sent, so that it survives the agent's
SIGKILL. An intent that no WRITE of the same value follows (the agent died with the write
in flight, or gave up waiting for it, and hmmd may still perform it) may land at any time
after ``t0``, and overrides nothing."""
WRITE_FAILED = 4
"""hmmd refused the WRITE of ``value`` before copying anything: its intent is closed."""
# Atomic kinds (``check.atomics``): ``addr`` is the page's, ``extra`` the op's token.
ATOMIC_INTENT = 5
"""Written straight to the log before an atomic is sent (``value`` 0), like WRITE_INTENT."""
FADD = 6
"""A FETCH_ADD of 1 answered: ``value`` is the old value it returned."""
CAS_OK = 7
"""A COMPARE_SWAP of v for v + 1 that found v (``value``), and so incremented the word."""
CAS_FAIL = 8
"""A COMPARE_SWAP that found ``value`` (not what it expected), and wrote nothing."""
ATOMIC_FAILED = 9
"""hmmd refused the atomic before applying it (the rules of WRITE_FAILED): its intent is closed."""
#: The end of time, for an intent whose write may land whenever hmmd gets to it.
FOREVER = (1 << 64) - 1
#: DMA_LOG flag: the page's bytes 16..4096 were not all zero.
GARBAGE = 1
#: Target log flag (``extra`` of a SET of UNMAPPED): the target munmapped the page, and
#: left a hole that any mapping of its process may take (its allocator's, a library's)
#: until it maps the page again. A READ or WRITE there then lands in that mapping, as HMM
#: says it must: the page may show anything, and a WRITE may land.
HOLE = 2
#: In the mapped timeline: a hole some other mapping may have taken.
ANY = (1 << 64) - 2

_WRITE_KINDS = (WRITE, WRITE_INTENT, WRITE_FAILED)
#: The mapped timeline's values: unmapped, mapped, and a hole (unmapped, or taken).
_GONE, _THERE, _HOLE = frozenset((UNMAPPED,)), frozenset((ZERO,)), frozenset((UNMAPPED, ANY))

RECORD = np.dtype(
    [("t0", "<u8"), ("t1", "<u8"), ("addr", "<u8"), ("kind", "<u8"), ("value", "<u8"),
     ("extra", "<u8")]
)  # fmt: skip


def stamp(writer: int, gen: int, page: int, version: int) -> int:
    """The stamp word for ``writer``'s ``version``-th write of arena page ``page``."""
    return (
        (writer & 0xFF) << 56 | (gen & 0xFFFF) << 40 | (page & 0xFF) << 32 | (version & 0xFFFFFFFF)
    )


def describe(value: int) -> str:
    """A stamp in words, for violation reports."""
    if value == UNMAPPED:
        return "unmapped"
    if value == ZERO:
        return "zero"
    writer = value >> 56
    who = {WRITER_TARGET: "target", WRITER_CHILD: "fork child"}.get(
        writer, f"agent {writer - WRITER_AGENT}" if writer >= WRITER_AGENT else f"?{writer:#x}"
    )
    return (
        f"{who} gen {(value >> 40) & 0xFFFF} page {(value >> 32) & 0xFF} "
        f"v{value & 0xFFFFFFFF} ({value:#018x})"
    )


def record(t0: int, t1: int, addr: int, kind: int, value: int, extra: int = 0) -> bytes:
    """One log record's bytes."""
    return np.array([(t0, t1, addr, kind, value, extra)], dtype=RECORD).tobytes()


def load(path: str) -> npt.NDArray[np.void]:
    """A log file's records (a partial trailing record, from a killed writer, is dropped)."""
    with open(path, "rb") as f:
        raw = f.read()
    usable = len(raw) - len(raw) % RECORD.itemsize
    return np.frombuffer(raw[:usable], dtype=RECORD)


@dataclass(frozen=True)
class DataViolation:
    """A DMA READ that returned a value no moment of its flight could have shown (or a
    WRITE logged as landed on a page that was unmapped all through its flight)."""

    addr: int
    t0: int
    t1: int
    got: int
    live: tuple[int, ...]
    kind: str
    op: str = "READ"

    def text(self) -> str:
        """The one-line detail of the violation report."""
        live = ", ".join(describe(x) for x in self.live) or "nothing"
        verb = "got" if self.op == "READ" else "wrote"
        return (
            f"{self.op} at {self.addr:#x} over [{self.t0}, {self.t1}] ns {verb} "
            f"{describe(self.got)}; live then: {live}"
        )


class _Page:
    """One page's changes: t0, t1, whether each can override older ones, and its values."""

    def __init__(self) -> None:
        self.t0: list[int] = []
        self.t1: list[int] = []
        self.strong: list[bool] = []
        self.values: list[frozenset[int]] = []
        self._arrays: tuple[npt.NDArray[np.uint64], ...] | None = None

    def add(self, t0: int, t1: int, values: frozenset[int], strong: bool = True) -> None:
        """Log a change that happened at one instant inside [t0, t1]."""
        self.t0.append(t0)
        self.t1.append(t1)
        self.strong.append(strong)
        self.values.append(values)
        self._arrays = None

    def live(self, s: int, r: int) -> set[int]:
        """Every value the page may have shown at some instant in [s, r]."""
        if self._arrays is None:
            self._arrays = (
                np.array(self.t0, dtype=np.uint64),
                np.array(self.t1, dtype=np.uint64),
                np.array(self.strong, dtype=np.bool_),
            )
        t0, t1, strong = self._arrays
        done = strong & (t1 < s)  # changes certainly over before the DMA began
        newest = t0[done].max() if done.any() else np.uint64(0)
        # Not certainly overridden before s, and possibly begun by r.
        keep = np.flatnonzero((t0 <= r) & (t1 >= newest))
        out: set[int] = set()
        for i in keep:
            out |= self.values[i]
        return out


class DataOracle:
    """Judges DMA READ results against the target's change log and the agents' writes."""

    def __init__(self, base: int, npages: int, t_start: int) -> None:
        self.base = base
        self.npages = npages
        self.pages: dict[int, _Page] = defaultdict(_Page)
        #: The target's changes alone, as mapped or not: whether a WRITE could have landed.
        self.mapped: dict[int, _Page] = defaultdict(_Page)
        for i in range(npages):  # the arena starts reserved PROT_NONE
            self.pages[base + i * PAGE].add(0, t_start, frozenset((UNMAPPED,)))
            self.mapped[base + i * PAGE].add(0, t_start, _GONE)
        self.reads = 0

    def feed(
        self, target_log: npt.NDArray[np.void], dma_logs: Iterable[npt.NDArray[np.void]]
    ) -> None:
        """Load every change: the agents' writes first, then the target's own, in its order.

        FREE and MOVE take the values the page (or its source) may have held
        while they ran, and an agent's write that landed just before counts.
        """
        writes = [log[np.isin(log["kind"], _WRITE_KINDS)] for log in dma_logs]
        outcomes = {
            (int(rec["addr"]), int(rec["value"]))
            for log in writes
            for rec in log
            if int(rec["kind"]) != WRITE_INTENT
        }
        for log in writes:
            for rec in log:
                kind, addr, value = int(rec["kind"]), int(rec["addr"]), int(rec["value"])
                t1 = int(rec["t1"])
                if kind == WRITE_FAILED:
                    continue  # refused: the value never landed (its intent is closed too)
                if kind == WRITE_INTENT:
                    if (addr, value) in outcomes:
                        continue  # its WRITE (or WRITE_FAILED) says what became of it
                    t1 = FOREVER
                self.pages[addr].add(int(rec["t0"]), t1, frozenset((value,)), strong=kind == WRITE)
        for rec in target_log:
            t0, t1, addr, kind = int(rec["t0"]), int(rec["t1"]), int(rec["addr"]), int(rec["kind"])
            if kind == SET:
                values = frozenset((int(rec["value"]),))
            elif kind == FREE:
                values = frozenset(self.pages[addr].live(t0, t1) | {ZERO}) - {UNMAPPED}
            else:
                values = frozenset(self.pages[int(rec["extra"])].live(t0, t1)) - {UNMAPPED}
            self.pages[addr].add(t0, t1, values)
            gone = kind == SET and int(rec["value"]) == UNMAPPED
            hole = gone and int(rec["extra"]) & HOLE
            self.mapped[addr].add(t0, t1, _HOLE if hole else _GONE if gone else _THERE)

    def judge(self, dma_logs: Iterable[npt.NDArray[np.void]]) -> list[DataViolation]:
        """Every READ whose value was never live during its flight, or whose page had garbage;
        every WRITE logged as landed while its page was certainly unmapped."""
        found = []
        for log in dma_logs:
            for rec in log[log["kind"] == WRITE]:
                addr, t0, t1 = int(rec["addr"]), int(rec["t0"]), int(rec["t1"])
                if addr in self.mapped and self.mapped[addr].live(t0, t1) == _GONE:
                    found.append(
                        DataViolation(
                            addr, t0, t1, int(rec["value"]), (UNMAPPED,),
                            "write landed on an unmapped page", "WRITE",
                        )
                    )  # fmt: skip
            for rec in log[log["kind"] == READ]:
                self.reads += 1
                addr, s, r, got = (
                    int(rec["addr"]),
                    int(rec["t0"]),
                    int(rec["t1"]),
                    int(rec["value"]),
                )
                if addr in self.mapped and ANY in self.mapped[addr].live(s, r):
                    continue  # a hole another mapping may have taken: any bytes at all
                live = self.pages[addr].live(s, r) if addr in self.pages else {UNMAPPED}
                if int(rec["extra"]) & GARBAGE:
                    found.append(DataViolation(addr, s, r, got, tuple(sorted(live)), "garbage"))
                elif got not in live:
                    found.append(
                        DataViolation(
                            addr, s, r, got, tuple(sorted(live)), "read a value never live"
                        )
                    )
        return found
