"""The checker's atomic oracle and refused writes: the rules on hand-made logs, and proof on
real runs that a lying agent is caught while the honest ones in the same run are not.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from hmmirror.tools.check import Checker, Options
from hmmirror.tools.check.atomics import AtomicOracle
from hmmirror.tools.check.stamps import (
    ATOMIC_FAILED,
    ATOMIC_INTENT,
    CAS_FAIL,
    CAS_OK,
    FADD,
    FREE,
    MOVE,
    READ,
    RECORD,
    SET,
    UNMAPPED,
    WRITE,
    WRITE_FAILED,
    WRITE_INTENT,
    WRITER_AGENT,
    WRITER_TARGET,
    ZERO,
    DataOracle,
    stamp,
)

BASE = 0x10000
PAGE = 4096


def _log(*rows: tuple[int, int, int, int, int, int]) -> np.ndarray:
    return np.array(list(rows), dtype=RECORD)


def _summary(report: object) -> str:
    return "\n".join(f"{k}: {d}" for k, d in getattr(report, "violations", [])[:20])


def _judge(target: np.ndarray, *agents: np.ndarray) -> list[str]:
    oracle = AtomicOracle(BASE, 2, 1)
    return [v.kind for v in oracle.judge(target, list(agents))]


def _fadd(t0: int, t1: int, old: int, token: int, addr: int = BASE) -> list[tuple[int, ...]]:
    return [(t0, t0, addr, ATOMIC_INTENT, 0, token), (t0, t1, addr, FADD, old, token)]


def test_atomic_oracle_accepts_every_order_the_windows_allow() -> None:
    """Overlapping FETCH_ADDs may return their values in either order; a reset zeroes the
    counter; a move carries it; an intent with no outcome may have landed."""
    target = _log(
        (10, 20, BASE, SET, ZERO, 0),  # mmap: counter 0
        (300, 310, BASE, SET, ZERO, 0),  # DONTNEED: 0 again
        (500, 510, BASE, SET, UNMAPPED, 0),  # mremap to the next page
        (500, 510, BASE + PAGE, MOVE, 0, BASE),
    )
    agent = _log(
        *_fadd(30, 60, 1, 1),  # overlaps the next: either may have run first
        *_fadd(40, 50, 0, 2),
        *_fadd(70, 80, 2, 3),
        (90, 90, BASE, ATOMIC_INTENT, 0, 4),  # killed in flight: may have landed...
        *_fadd(100, 110, 4, 5),  # ...so 4 is possible (3 if it did not)
        *_fadd(320, 330, 0, 6),
        *_fadd(600, 610, 1, 7, BASE + PAGE),  # the moved counter goes on
        (620, 620, BASE + PAGE, ATOMIC_INTENT, 0, 8),
        (620, 630, BASE + PAGE, CAS_FAIL, 2, 8),  # a failed CAS only reads
        *_fadd(640, 650, 2, 9, BASE + PAGE),
    )
    assert _judge(target, agent) == []


@pytest.mark.parametrize(
    ("ops", "kind"),
    [
        (_fadd(30, 40, 0, 1) + _fadd(50, 60, 0, 2), "went back"),  # a repeat, in order
        (_fadd(30, 60, 0, 1) + _fadd(40, 50, 0, 2), "same value twice"),  # concurrent repeat
        (_fadd(30, 40, 1, 1), "too high"),  # nothing could have counted 1 since the mmap
        (_fadd(30, 40, 0, 1) + _fadd(50, 60, 3, 2), "too high"),
        (_fadd(30, 40, 0, 1) + _fadd(45, 48, 0, 3) + _fadd(50, 60, 1, 2), "went back"),
    ],
)
def test_atomic_oracle_catches_results_no_order_explains(
    ops: list[tuple[int, ...]], kind: str
) -> None:
    """A value repeated, gone back, or higher than the increments that could precede it."""
    target = _log((10, 20, BASE, SET, ZERO, 0))
    assert kind in _judge(target, _log(*ops))


def test_atomic_oracle_judges_nothing_across_a_possible_reset() -> None:
    """An atomic whose flight overlaps a reset, or a lazy free before the next write, is not
    judged: it may have run on either side."""
    target = _log(
        (10, 20, BASE, SET, ZERO, 0),
        (100, 110, BASE, SET, ZERO, 0),
        (200, 210, BASE, FREE, 0, 0),  # MADV_FREE: may zero until the page is next written
        (250, 260, BASE, SET, stamp(WRITER_TARGET, 1, 0, 1), 0),  # the store that ends it
    )
    agent = _log(
        *_fadd(30, 40, 0, 1),
        *_fadd(90, 120, 0, 2),  # straddles the DONTNEED: not judged
        *_fadd(130, 140, 0, 3),
        *_fadd(230, 240, 0, 4),  # zeroed by the lazy free, or not: not judged
        *_fadd(500, 510, 1, 5),
        (600, 600, BASE, ATOMIC_INTENT, 0, 6),
        (600, 610, BASE, ATOMIC_FAILED, 0, 6),  # refused: changed nothing
        *_fadd(620, 630, 2, 7),
    )
    oracle = AtomicOracle(BASE, 2, 1)
    assert oracle.judge(target, [agent]) == []
    assert oracle.judged == 4  # all but the straddling and the lazily freed ones


def test_an_increment_straddling_a_reset_may_carry_its_value_across_it_and_no_further() -> None:
    """hmmd reads the word, then writes the result: a DONTNEED in between leaves old + 1 on
    the new page (as in seed 1's million-operation run). The next increment may return it;
    one more than that is still too high."""
    target = _log((10, 20, BASE, SET, ZERO, 0), (100, 110, BASE, SET, ZERO, 0))
    before = _fadd(30, 40, 0, 1) + _fadd(50, 60, 1, 2)  # the old page's counter: 2
    straddling = [(90, 90, BASE, ATOMIC_INTENT, 0, 3), (90, 120, BASE, CAS_OK, 2, 3)]
    assert _judge(target, _log(*before, *straddling, *_fadd(130, 140, 3, 4))) == []
    assert _judge(target, _log(*before, *straddling, *_fadd(130, 140, 4, 4))) == ["too high"]
    # Without the straddling increment nothing can carry: 0 only.
    assert _judge(target, _log(*before, *_fadd(130, 140, 3, 4))) == ["too high"]


def test_refused_write_closes_its_intent_and_a_landed_write_needs_a_mapped_page() -> None:
    """WRITE_FAILED closes its intent (the value never shows); a WRITE logged while the page
    was certainly unmapped could not have landed."""
    first = stamp(WRITER_TARGET, 1, 0, 1)
    refused, lie = stamp(WRITER_AGENT, 0, 0, 1), stamp(WRITER_AGENT, 0, 0, 2)
    target = _log(
        (10, 20, BASE, SET, ZERO, 0),
        (30, 40, BASE, SET, first, 0),
        (100, 110, BASE, SET, UNMAPPED, 0),
    )
    agent = _log(
        (50, 50, BASE, WRITE_INTENT, refused, 0),
        (50, 60, BASE, WRITE_FAILED, refused, 0),
        (150, 150, BASE, WRITE_INTENT, lie, 0),
        (150, 160, BASE, WRITE, lie, 0),  # the page was gone since 110
    )
    reads = _log((70, 80, BASE, READ, refused, 0), (70, 80, BASE, READ, first, 0))
    oracle = DataOracle(BASE, 1, 1)
    oracle.feed(target, [agent, reads])
    bad = oracle.judge([agent, reads])
    assert [(v.kind, v.got) for v in bad] == [
        ("write landed on an unmapped page", lie),
        ("read a value never live", refused),
    ]
    assert "WRITE at" in bad[0].text()


@pytest.mark.timeout(300)
async def test_an_agent_lying_about_atomics_is_caught_by_the_atomic_oracle() -> None:
    """agent-0 logs a neighbour's value for some FETCH_ADDs: the atomic oracle flags it, and
    every atomic violation names one of agent-0's results (an honest op is flagged only
    beside the lie it contradicts: the honest agents alone raise nothing).

    A lie of old + 1 is seen only when something contradicts it: a later result, or the
    count a reset of the page ends. One that an overlapping honest increment could explain,
    or that a reset follows at once, goes unseen, so a short run can miss every lie (two CI
    runs on 2026-12-06 flagged nothing, with 38 atomics judged in one): up to three runs,
    each of a new seed, until one flags; each run must flag agent 0 only."""
    runs = []
    for seed in (6, 7, 8):
        report = await Checker(
            Options(seed=seed, duration=8.0, agents=3, scenario="lie-atomic")
        ).run()
        atomic = [(k, d) for k, d in report.violations if k.startswith("atomic:")]
        runs.append(f"seed {seed}: {report.atomics_judged} atomics judged; {report.by_kind()}")
        assert report.atomics_judged > 20, runs[-1]
        assert all("of agent 0 " in d for _, d in atomic if d != "(more)"), _summary(report)
        assert report.by_kind()["stale translation"] == 0, _summary(report)
        if report.logs and os.path.isdir(report.logs):
            shutil.rmtree(report.logs)  # kept because of the (expected) violations
        if atomic:
            break
    assert atomic, "no atomic violation in any run: " + "; ".join(runs)


@pytest.mark.timeout(300)
async def test_a_refused_write_logged_as_landed_is_caught_by_the_data_oracle() -> None:
    """agent-0 logs the WRITEs hmmd refused as landed: the data oracle flags writes on pages
    that were unmapped all along, or READs that got the page's real value where it believed
    agent-0's write, and every one is agent-0's. Which of the two a run shows depends on the
    interleaving (a CI run on 2026-12-06 caught the lie by READs only).

    A lie on a page the target munmapped is not seen: another mapping may have taken the
    hole, and the write landed there (``stamps.HOLE``). So a short run may see no lie: up to
    three runs, each of a new seed, until one flags (as the atomic lie's test does); each
    run must flag agent 0 only."""
    landed, never_live = "data: write landed on an unmapped page", "data: read a value never live"
    runs = []
    for seed in (6, 7, 8):
        report = await Checker(
            Options(seed=seed, duration=4.0, agents=3, scenario="lie-write")
        ).run()
        kinds = report.by_kind()
        runs.append(f"seed {seed}: {kinds[landed]} landed, {kinds[never_live]} never live")
        caught = [(k, d) for k, d in report.violations if k in (landed, never_live)]
        assert all(
            ("wrote agent 0 " if k == landed else "live then: agent 0 ") in d
            for k, d in caught
            if d != "(more)"
        ), _summary(report)
        assert not any(k.startswith("atomic:") for k in kinds), _summary(report)
        if report.logs and os.path.isdir(report.logs):
            shutil.rmtree(report.logs)
        if caught:
            break
    assert caught, "no lie caught in any run: " + "; ".join(runs)


@pytest.mark.timeout(150)
async def test_honest_run_judges_atomics_and_closes_refused_writes() -> None:
    """With no fault planted, atomics are judged and refused writes logged: 0 violations."""
    report = await Checker(Options(seed=14, duration=4.0, agents=3)).run()
    assert not report.violations, _summary(report)
    # How many fit in 4 s is the machine's: 34-37 on a quiet 2-vCPU guest, 19 on a clean
    # clone's first minutes (2026-12-08, every process compiling its modules), where "> 20"
    # failed. Judged at all, several times over, is what this test asks.
    assert report.atomics_judged >= 10, _summary(report)
