"""What the page-table property tests draw: pagemap entries, VMA kinds, whole walks.

Shared by ``test_pagetable.py`` (``derive``, ``vma_perms``) and
``test_pagetable_changes.py`` (``classify``, ``runs``). Entries are decoded from
one drawn integer each, so a walk of :data:`MAX_PAGES` pages draws quickly, and
every list is half the time uniform, so that ``derive``'s fast paths (every page
readable, every page writable, no shared VMA) run as often as its mixed paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hmmirror.daemon.linux.procfs import (
    PM_EXCLUSIVE,
    PM_FILE,
    PM_PFN_MASK,
    PM_PRESENT,
    PM_SWAPPED,
    PM_UFFD_WP,
)
from hmmirror.daemon.pagetable import Perms, derive
from hypothesis import settings
from hypothesis import strategies as st

#: Longest range drawn, in pages.
MAX_PAGES = 48
#: Examples per property: enough to reach every branch, small enough for 2 shared vCPUs.
EXAMPLES = 100
#: The kernel's zero page in these tests (a real one is announced at welcome).
ZERO_PFN = 0x1234
#: Where the drawn ranges start: a page-aligned user address.
BASE = 0x7F00_0000_0000

PRESENT, EXCL, UFFD_WP = int(PM_PRESENT), int(PM_EXCLUSIVE), int(PM_UFFD_WP)
PFN_MASK = int(PM_PFN_MASK)

fast = settings(deadline=None, max_examples=EXAMPLES)


@dataclass(frozen=True)
class Kind:
    """One page's VMA, as ``/proc/PID/maps`` would show it (None: no VMA covers the page)."""

    covered: bool
    readable: bool
    writable: bool
    shared: bool


#: Every kind of VMA the walk distinguishes. A special mapping ([vvar], a device) reads as
#: covered but unreadable, like PROT_NONE; writable implies readable (``vma_perms``).
KINDS = {
    "none": Kind(False, False, False, False),
    "prot_none": Kind(True, False, False, False),
    "r_private": Kind(True, True, False, False),
    "rw_private": Kind(True, True, True, False),
    "r_shared": Kind(True, True, False, True),
    "rw_shared": Kind(True, True, True, True),
}


#: A page's VMA; the writable private kind, where most of the WRITE rules apply, twice as often.
kind_st = st.sampled_from([*KINDS.values(), KINDS["rw_private"]])


def perms_of(kinds: list[Kind]) -> Perms:
    """The ``Perms`` arrays of a list of per-page kinds."""
    return Perms(
        np.array([k.covered for k in kinds], dtype=np.bool_),
        np.array([k.readable for k in kinds], dtype=np.bool_),
        np.array([k.writable for k in kinds], dtype=np.bool_),
        np.array([k.shared for k in kinds], dtype=np.bool_),
    )


def sliced(perms: Perms, a: int, b: int) -> Perms:
    """The ``Perms`` of pages [a, b)."""
    return Perms(perms.covered[a:b], perms.readable[a:b], perms.writable[a:b], perms.shared[a:b])


# Plain integers draw several times faster than composite strategies; the low digits of a
# code pick the shape. Codes are scrambled first (multiplying by an odd number is a bijection
# modulo a power of two), so the small integers hypothesis favours still pick every shape.
U64_MAX = (1 << 64) - 1
CODE_BITS = 80
MIX = 0x9E37_79B9_7F4A_7C15
code_st = st.integers(0, (1 << CODE_BITS) - 1).map(lambda c: (c * MIX) % (1 << CODE_BITS))


def pfn_of(code: int) -> int:
    """A PFN: the zero page, one of a few small ones (so two reads often agree), or any
    52-bit frame (real PFNs stay below the map-order bits)."""
    which, rest = code % 3, code // 3
    return (ZERO_PFN, 1 + rest % 8, rest % (1 << 52))[which]


def raw_of(code: int) -> int:
    """One pagemap entry: present (PFN, exclusive, uffd-wp, file bits), the zero page, swapped,
    empty, or any 64 bits at all (reserved bits included)."""
    shape, rest = code % 6, code // 6
    flags, rest = rest % 8, rest // 8
    bits = (EXCL if flags & 1 else 0) | (UFFD_WP if flags & 2 else 0)
    bits |= int(PM_FILE) if flags & 4 else 0
    if shape == 0 or shape == 1:
        return PRESENT | bits | pfn_of(rest)
    if shape == 2:  # a never-written private page reads as the zero page
        return PRESENT | bits | ZERO_PFN
    if shape == 3:  # swap type and offset sit where the PFN would be
        return int(PM_SWAPPED) | bits | rest % (PFN_MASK + 1)
    if shape == 4:
        return 0
    return (code >> 16) & U64_MAX  # the scrambled code's high bits: any 64 bits


raw_entry = code_st.map(raw_of)


def uniform_or_mixed(elem: st.SearchStrategy[object], n: int) -> st.SearchStrategy[list[object]]:
    """``n`` elements, half the time all equal (the walk's fast paths), else drawn apiece."""
    return st.one_of(
        elem.map(lambda e: [e] * n),
        st.lists(elem, min_size=n, max_size=n),
    )


@dataclass(frozen=True)
class Walk:
    """The inputs of one ``derive`` call, plus the per-page kinds they came from."""

    raw: list[int]
    kinds: list[Kind]
    zero_pfn: int
    write_fault: bool
    huge: list[bool] | None

    def arrays(self) -> tuple[np.ndarray, Perms, np.ndarray | None]:
        """Fresh numpy inputs for ``derive``."""
        huge = None if self.huge is None else np.array(self.huge, dtype=np.bool_)
        return np.array(self.raw, dtype=np.uint64), perms_of(self.kinds), huge

    def derive(self) -> list[int]:
        """``derive`` on these inputs, as Python ints."""
        raw, perms, huge = self.arrays()
        return [int(e) for e in derive(raw, perms, self.zero_pfn, self.write_fault, huge)]


@st.composite
def walks(draw: st.DrawFn, min_pages: int = 1) -> Walk:
    """Inputs of a ``derive`` call over 1..MAX_PAGES pages."""
    n = draw(st.integers(min_pages, MAX_PAGES))
    raw = draw(uniform_or_mixed(raw_entry, n))
    kinds = draw(uniform_or_mixed(kind_st, n))
    huge = draw(st.one_of(st.none(), uniform_or_mixed(st.booleans(), n)))
    zero_pfn = draw(st.sampled_from([0, ZERO_PFN, ZERO_PFN]))  # mostly known, as on Linux
    write_fault = draw(st.sampled_from([False, False, True]))  # read faults have more rules
    return Walk(raw, kinds, zero_pfn, write_fault, huge)  # type: ignore[arg-type]
