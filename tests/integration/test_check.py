"""The coherence checker (``hmmctl check``): clean runs, and proof that both oracles can fail.

Every run is real: a private hmmd, the stamped target and three agent
processes on real sockets, judged against /proc by the checker itself.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hmmirror.client import Access, DeviceError
from hmmirror.proto.entries import HMM_PFN_VALID, HMM_PFN_WRITE
from hmmirror.testing.quiesce import quiesce
from hmmirror.tools.check import Checker, Options
from hmmirror.tools.check.stamps import (
    READ,
    RECORD,
    SET,
    UNMAPPED,
    WRITE,
    WRITE_INTENT,
    WRITER_AGENT,
    WRITER_TARGET,
    ZERO,
    DataOracle,
    stamp,
)
from hmmirror.tools.oracle import check, check_table

PAGE = 4096


def _summary(report: object) -> str:
    return "\n".join(f"{k}: {d}" for k, d in getattr(report, "violations", [])[:20])


@pytest.mark.timeout(150)
@pytest.mark.parametrize("seed", [11, 12])
async def test_checker_seeded_run_is_coherent(seed: int) -> None:
    """Three agents, one seed, a few seconds of churn: no violation, and real work was judged."""
    report = await Checker(Options(seed=seed, duration=4.0, agents=3)).run()
    assert not report.violations, _summary(report)
    assert report.rounds >= 2
    assert report.translations_checked > 0, "no VALID entry was ever checked"
    assert report.reads_judged > 50, "the data oracle judged almost nothing"
    assert sum(report.target_ops.values()) >= 2 * 80
    assert int(report.hmmd.get("invalidations", 0)) > 0


@pytest.mark.timeout(150)
async def test_broken_agent_that_acks_before_zapping_is_caught() -> None:
    """An agent that ACKs an INVALIDATE and zaps later holds stale entries: violations > 0."""
    report = await Checker(Options(seed=5, duration=3.0, agents=3, scenario="broken-ack")).run()
    kinds = report.by_kind()
    assert kinds["stale translation"] > 0, _summary(report)
    shutil.rmtree(report.logs)  # kept because of the (expected) violations


@pytest.mark.timeout(150)
async def test_corrupted_reads_are_caught_by_the_data_oracle() -> None:
    """An agent whose READ results are wrong is caught by the data oracle (it alone sees data)."""
    report = await Checker(Options(seed=6, duration=3.0, agents=3, scenario="corrupt-read")).run()
    kinds = report.by_kind()
    assert kinds["data: read a value never live"] > 0, _summary(report)
    assert kinds["stale translation"] == 0, _summary(report)
    shutil.rmtree(report.logs)  # kept because of the (expected) violations


def _log(*rows: tuple[int, int, int, int, int, int]) -> np.ndarray:
    return np.array(list(rows), dtype=RECORD)


def test_data_oracle_rules_out_only_values_certainly_overwritten_before_the_read() -> None:
    """Times are uncertain intervals: a value dies only once a later change surely finished."""
    base = 0x10000
    old, new = stamp(WRITER_TARGET, 1, 0, 1), stamp(WRITER_TARGET, 1, 0, 2)
    target = _log(
        (10, 20, base, SET, ZERO, 0), (30, 40, base, SET, old, 0), (100, 110, base, SET, new, 0)
    )
    reads = _log(
        (50, 60, base, READ, old, 0),  # only old is live: fine
        (105, 120, base, READ, old, 0),  # overlaps the write of new: old may still show
        (200, 210, base, READ, old, 0),  # new surely landed at 110 < 200: stale data
        (200, 210, base, READ, new, 0),
        (5, 8, base, READ, ZERO, 0),  # before the mmap: unmapped, no value could be read
    )
    oracle = DataOracle(base, 1, 1)
    oracle.feed(target, [reads])
    bad = oracle.judge([reads])
    assert [(v.t0, v.got) for v in bad] == [(200, old), (5, ZERO)]
    assert UNMAPPED in bad[1].live


def test_data_oracle_keeps_a_write_whose_agent_died_in_flight_possible() -> None:
    """An agent SIGKILLed with a WRITE in flight, or one that gave up waiting for it, leaves
    only its intent in the log; hmmd may still perform the write later, so its value may show
    from then on (the agent-kill scenario read such a value once and the oracle called it
    never live)."""
    base = 0x10000
    first = stamp(WRITER_TARGET, 1, 0, 1)
    lost, done = stamp(WRITER_AGENT, 0, 0, 8), stamp(WRITER_AGENT, 0, 0, 9)
    target = _log((10, 20, base, SET, first, 0), (100, 110, base, SET, first + 1, 0))
    agent = _log(
        (30, 30, base, WRITE_INTENT, lost, 0),  # the agent died before it knew the outcome
        (40, 40, base, WRITE_INTENT, done, 0),
        (40, 50, base, WRITE, done, 0),  # this one completed at 50
    )
    reads = _log(
        (200, 210, base, READ, lost, 0),  # possible: hmmd may have done it after 110
        (200, 210, base, READ, done, 0),  # stale: it landed by 50 and 100..110 overwrote it
        (200, 210, base, READ, first, 0),  # stale
    )
    oracle = DataOracle(base, 1, 1)
    oracle.feed(target, [agent, reads])
    bad = oracle.judge([reads])
    assert [v.got for v in bad] == [done, first]
    assert lost in bad[0].live


@pytest.mark.timeout(60)
async def test_discarded_fault_reply_leaves_no_entry_hmmd_no_longer_tracks(hmmd, puppet, agent):
    """A FAULT reply dropped by read_retry must not leave the older entry behind.

    hmmd records every reply as what the mirror holds; keeping an older WRITE
    entry over a discarded read-fault reply made it stale for good: after an
    mprotect to read-only, no INVALIDATE ever named it (found by ``hmmctl check``).
    """
    addr = await puppet.mmap(2 * PAGE)
    async with agent() as s:
        mirror = await s.mirror(puppet.pid, addr, 2 * PAGE, Access.READ | Access.WRITE)
        await mirror.populate(addr, 1, write=True)  # the zero page, WRITE (the VMA allows it)
        assert int(mirror.table[0]) & HMM_PFN_WRITE

        async def race() -> None:
            # A real invalidation of the other page while each reply is on its way.
            await s.sync_range(puppet.pid, addr + PAGE, addr + 2 * PAGE)

        mirror.fault_hook = race
        with pytest.raises(DeviceError) as caught:
            await mirror.populate(addr, 1, write=False)  # replies: zero page, no WRITE
        assert caught.value.errno == errno.EBUSY
        mirror.fault_hook = None
        assert not int(mirror.table[0]) & HMM_PFN_VALID
        await puppet.mprotect(addr, 2 * PAGE, "r")
        await asyncio.sleep(0.3)  # several watcher polls
        assert check(mirror) == []


@pytest.mark.timeout(60)
@pytest.mark.hmmd_args("--poll-interval", "2s", "--poll-max", "2s")
async def test_quiescence_waits_for_the_watcher_poll_that_sees_an_mprotect(hmmd, puppet, agent):
    """quiesce may call hmmd caught up only after its polls could have seen the last change.

    An mprotect raises no userfaultfd event: only the maps poll sees it
    (docs/ARCHITECTURE.md §A.4). The wait used to end after two fixed looks
    (about 0.2 s), while a poll interval stretched by load (20 times its cost)
    can be longer: the demo then reported the WRITE entry as stale. Here the
    poll interval is 2 s, and the mprotect lands just after a poll.
    """
    addr = await puppet.mmap(2 * PAGE)
    async with agent() as s:
        mirror = await s.mirror(puppet.pid, addr, 2 * PAGE, Access.READ | Access.WRITE)
        await mirror.populate(addr, 2, write=True)
        assert int(mirror.table[1]) & HMM_PFN_WRITE
        before = int((await s.status())["invalidations"])
        await puppet.mprotect(addr, PAGE, "r")  # the next poll invalidates page 0...
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while int((await s.status())["invalidations"]) == before:
            assert loop.time() < deadline, "no poll saw the first mprotect in 10 s"
            await asyncio.sleep(0.01)
        await puppet.mprotect(addr + PAGE, PAGE, "r")  # ...and this one waits a whole interval
        assert float((await s.status())["watch_lag_s"]) >= 2.0
        early = await quiesce(hmmd.endpoint, 0.5)  # a wait that gives up says why
        assert not early
        assert "watcher lag" in early.why or "moving" in early.why, early.why
        assert await quiesce(hmmd.endpoint, 20)
        assert check(mirror) == []


@pytest.mark.timeout(30)
async def test_a_quiescence_wait_without_hmmd_says_hmmd_did_not_answer(tmp_path):
    settled = await quiesce(f"ipc://{tmp_path}/nobody", 0.5)
    assert not settled
    assert "did not answer" in settled.why, settled.why


@pytest.mark.timeout(150)
def test_hmmctl_check_cli_reports_seed_and_fails_on_violations() -> None:
    """``hmmctl check`` prints the report table and exits 1 when a self-test breaks an agent."""
    ok = subprocess.run(
        [sys.executable, "-m", "hmmirror.tools.ctlapp", "check", "--seed", "13",
         "--duration", "2", "--agents", "3", "-q"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "seed" in ok.stdout and "READs judged" in ok.stdout
    listed = subprocess.run(
        [sys.executable, "-m", "hmmirror.tools.ctlapp", "check", "--scenario", "list"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "hmmd-restart" in listed.stdout
    broken = subprocess.run(
        [sys.executable, "-m", "hmmirror.tools.ctlapp", "check", "--seed", "13",
         "--duration", "2", "--agents", "3", "--scenario", "broken-ack", "-q"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "replay: hmmctl check --seed 13 --scenario broken-ack" in broken.stdout
    kept = re.search(r"logs kept in (/\S+)", broken.stdout)
    assert kept is not None and os.path.isdir(kept[1]), broken.stdout
    shutil.rmtree(kept[1])


@pytest.mark.timeout(90)
async def test_a_run_makes_its_minimum_quiescent_checks_even_past_its_duration() -> None:
    """On a loaded host (or with slow acks) the first round can take the whole duration; the
    run still makes ``min_rounds`` checks (a slow-agent run once ended after one)."""
    report = await Checker(Options(seed=5, duration=0.0, agents=1)).run()
    assert not report.violations, report.violations[:5]
    assert report.rounds == 2


@pytest.mark.timeout(60)
async def test_a_run_that_cannot_start_reports_it_and_keeps_its_logs() -> None:
    """hmmd refusing its options is a reported failure of the run, and hmmd's log survives it
    (before, the exception escaped and the log it named had just been deleted)."""
    report = await Checker(Options(seed=1, duration=0.0, agents=1, ack_deadline=-1.0)).run()
    assert [kind for kind, _ in report.violations] == ["checker error"], report.violations
    assert "hmmd did not start" in report.violations[0][1]
    assert os.path.isfile(os.path.join(report.logs, "hmmd.log"))
    shutil.rmtree(report.logs)


def test_a_scenario_refuses_too_few_agents() -> None:
    """slow-agent compares agent-0 with agent-1: with one agent it could only fail falsely."""
    with pytest.raises(ValueError, match="at least 2 agents"):
        Checker(Options(agents=1, scenario="slow-agent"))
    out = subprocess.run(
        [sys.executable, "-m", "hmmirror.tools.ctlapp", "check", "--scenario", "slow-agent",
         "--agents", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "at least 2" in out.stderr, out.stderr


def test_translation_oracle_compares_pfns_only_when_entries_carry_them() -> None:
    """A VALID entry naming another frame is a violation when entries are physical; frame
    tokens cannot be compared with pagemap PFNs, so then only presence is judged."""
    import ctypes
    import mmap

    buf = mmap.mmap(-1, 2 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf[0] = 1  # page 0 present; page 1 never touched
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        pfn = int.from_bytes(os.pread(fd, 8, (addr // PAGE) * 8), "little") & ((1 << 55) - 1)
    finally:
        os.close(fd)
    assert pfn, "PFNs are hidden: this test reads its own pagemap as root"
    table = np.array([HMM_PFN_VALID | (pfn + 1), HMM_PFN_VALID | 5], dtype=np.uint64)
    physical = check_table(1, os.getpid(), addr, table)
    assert [v.kind for v in physical] == [
        "entry names a replaced page",
        "entry for a page that is gone",
    ]
    tokens = check_table(1, os.getpid(), addr, table, physical=False)
    assert [v.kind for v in tokens] == ["entry for a page that is gone"]
    table[0] = HMM_PFN_VALID | pfn
    assert [v.kind for v in check_table(1, os.getpid(), addr, table)] == [
        "entry for a page that is gone"
    ]
