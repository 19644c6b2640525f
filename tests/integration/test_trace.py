"""``hmmctl trace``: hmmd's timeline (SPEC §4.8) as a Chrome trace event file.

A real hmmd, real targets and hand-driven agent connections make a fault race an
invalidation, a DMA go STALE and a session miss its ACK deadline while ``hmmctl trace``
records; the file must pass a strict Chrome trace event check (what Perfetto's JSON
importer and chrome://tracing accept: known phases, numeric times, properly nested
slices per track, a name for every track) and show each of those on its mirror's tracks.
Who may trace, one trace at a time, and the bounds are checked on the wire.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import (
    TRACE_COLUMNS,
    Ack,
    DmaRead,
    Error,
    Fault,
    FaultReply,
    Ok,
    SyncRange,
    Trace,
    TraceKind,
    TraceReply,
    Unregister,
)
from hmmirror.testing.curve import NO_KEY_ENV, curve_hmmd
from hmmirror.testing.rawpeer import POPULATE, RawPeer, raw_peer
from hmmirror.tools.ctltrace import chrome_trace

pytestmark = pytest.mark.timeout(60)

PAGE = 4096
HMMCTL = [sys.executable, "-m", "hmmirror.tools.ctlapp"]


# --- a strict Chrome trace event check --------------------------------------------------------

_COMMON = {"name", "cat", "ph", "ts", "pid", "tid", "args"}
_KEYS = {"X": _COMMON | {"dur"}, "i": _COMMON | {"s"}, "M": {"name", "ph", "pid", "tid", "args"}}
_METADATA = {"process_name": "name", "thread_name": "name",
             "process_sort_index": "sort_index", "thread_sort_index": "sort_index"}  # fmt: skip


def _number(value: object) -> bool:
    return type(value) in (int, float) and value >= 0  # type: ignore[operator]


def check_chrome_trace(doc: Any) -> list[dict[str, Any]]:
    """Assert ``doc`` is a well-formed Chrome trace event object (JSON object form); return
    its events. Slices on one (pid, tid) must nest: viewers drop the others."""
    text = json.dumps(doc, allow_nan=False)  # no NaN or Infinity: JSON proper
    assert json.loads(text) == doc
    assert type(doc) is dict and set(doc) <= {"traceEvents", "displayTimeUnit", "otherData"}
    assert doc.get("displayTimeUnit", "ms") in ("ms", "ns")
    events = doc["traceEvents"]
    assert type(events) is list
    named: set[tuple[int, int]] = set()
    used: set[tuple[int, int]] = set()
    slices: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for ev in events:
        assert type(ev) is dict, ev
        ph = ev.get("ph")
        assert ph in _KEYS, ev
        assert set(ev) <= _KEYS[ph] and {"name", "ph", "pid", "tid"} <= set(ev), ev
        assert type(ev["name"]) is str and ev["name"], ev
        assert type(ev["pid"]) is int and type(ev["tid"]) is int, ev
        assert ev["pid"] >= 0 and ev["tid"] >= 0, ev
        assert type(ev.get("args", {})) is dict, ev
        if ph == "M":
            field = _METADATA[ev["name"]]
            want = str if field == "name" else int
            assert type(ev["args"][field]) is want, ev
            if ev["name"] == "thread_name":
                named.add((ev["pid"], ev["tid"]))
            continue
        assert _number(ev["ts"]) and type(ev.get("cat", "")) is str, ev
        used.add((ev["pid"], ev["tid"]))
        if ph == "X":
            assert _number(ev["dur"]), ev
            slices.setdefault((ev["pid"], ev["tid"]), []).append((ev["ts"], ev["ts"] + ev["dur"]))
        else:
            assert ev["s"] in ("t", "p", "g"), ev
    assert used <= named, f"tracks without a thread_name: {used - named}"
    for track, spans in slices.items():
        stack: list[float] = []
        for begin, end in sorted(spans, key=lambda s: (s[0], -s[1])):
            while stack and stack[-1] <= begin:
                stack.pop()
            assert not stack or end <= stack[-1], f"slices overlap on {track}: {spans}"
            stack.append(end)
    return [ev for ev in events if ev["ph"] != "M"]


# --- the converter, on rows made by hand -------------------------------------------------------


def _rows(*rows: Sequence[int]) -> np.ndarray[Any, np.dtype[np.uint64]]:
    return np.array(rows, dtype="<u8").reshape(-1, len(TRACE_COLUMNS))


def test_overlapping_slices_get_lanes_and_unanswered_ones_run_to_the_end():
    k = TraceKind
    rows = _rows(
        (100, k.FAULT, 3, 2, 77, 10, 0x1000, 0x2000, 0),
        (150, k.INVALIDATE, 3, 2, 77, 6, 0x1000, 0x3000, 1),
        (200, k.FAULT, 3, 2, 77, 11, 0x1000, 0x2000, 1),  # overlaps fault 10: a second lane
        (300, k.ACK, 3, 2, 77, 6, 0x1000, 0x3000, 1),
        (310, k.INVALIDATE_END, 0, 0, 77, 6, 0x1000, 0x3000, 0),
        (400, k.FAULT_REPLY, 3, 2, 77, 10, 0x1000, 0x2000, 8),
        (450, k.ERROR, 3, 2, 77, 11, 0x1000, 0x2000, int(ErrorCode.NO_MIRROR)),
        (500, k.FAULT, 3, 2, 77, 12, 0x5000, 0x6000, 0),  # never answered
        (600, k.STALE, 0, 0, 77, 0, 0x1000, 0x2000, 0),
        (700, k.EVICT, 3, 2, 77, 0, 0x1000, 0x8000, 0),
    )
    doc = chrome_trace(rows, {"session:2": "racer", "evict:0": "no ACK"}, 1000, dropped=4)
    events = check_chrome_trace(doc)
    faults = sorted((e for e in events if e["name"] == "fault"), key=lambda e: e["ts"])
    assert [(f["ts"], f["dur"], f["args"]["id"]) for f in faults] == [
        (0.1, 0.3, 10), (0.2, 0.25, 11), (0.5, 0.5, 12),
    ]  # fmt: skip
    assert faults[0]["args"]["result"] == "ok" and faults[0]["args"]["seq"] == 8
    assert faults[1]["args"]["result"] == "NO_MIRROR" and faults[2]["args"]["unfinished"]
    assert faults[0]["tid"] != faults[1]["tid"] and faults[0]["tid"] == faults[2]["tid"]
    [inv] = [e for e in events if e["cat"] == "invalidations" and e["ph"] == "X"]
    assert inv["name"] == "invalidate CLEAR" and (inv["ts"], inv["dur"]) == (0.15, 0.16)
    assert inv["args"] == {"seq": 6, "start": "0x1000", "end": "0x3000", "event": "CLEAR"}
    [ack] = [e for e in events if e["name"] == "ack"]
    assert ack["tid"] == inv["tid"] and ack["args"] == {"seq": 6, "n": 1}
    [stale] = [e for e in events if e["name"] == "STALE"]
    [evicted] = [e for e in events if e["name"] == "evicted"]
    assert evicted["args"]["reason"] == "no ACK" and stale["args"]["why"]
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert "mirror 3 · racer (session 2) · faults #2" in names, names
    assert {e["pid"] for e in events} == {77} and doc["otherData"]["dropped"] == 4


def test_an_empty_trace_is_a_valid_file():
    doc = chrome_trace(_rows(), {}, 5)
    assert check_chrome_trace(doc) == []


# --- a hand-driven agent ---------------------------------------------------------------------


async def tracing(peer: RawPeer) -> None:
    """Wait until hmmd's tracer runs: a trace is then refused EBUSY (before its bounds are
    checked, so this probe, with a duration of 0, never starts one of its own)."""
    for _ in range(200):
        env = await peer.request(Trace(duration_ms=0))
        assert isinstance(env.msg, Error), env.msg
        if env.msg.code == ErrorCode.EBUSY:
            return
        assert env.msg.code == ErrorCode.EINVAL, env.msg
        await asyncio.sleep(0.05)
    pytest.fail("hmmctl trace never started tracing")


# --- the real thing -------------------------------------------------------------------------


async def test_hmmctl_trace_shows_a_fault_racing_an_invalidation(hmmd, puppet, tmp_path):
    """Two faults wait out an invalidation window that a sleeping agent keeps open until it
    is evicted; a DMA through the revoked translation is refused STALE meanwhile."""
    out = tmp_path / "trace.json"
    addr = await puppet.mmap(4 * PAGE)
    await puppet.write(addr, b"t" * 4 * PAGE)
    ctl = await asyncio.create_subprocess_exec(
        *HMMCTL, "trace", "--seconds", "4", "-o", str(out), "-j", "--endpoint", hmmd.endpoint,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    async with raw_peer(hmmd.endpoint, 10) as racer, raw_peer(hmmd.endpoint, 10) as sleeper, \
            raw_peer(hmmd.endpoint, 10) as target:  # fmt: skip
        await tracing(target)
        await racer.hello("racer", heartbeat=True)
        await sleeper.hello("sleeper", heartbeat=True)
        await target.hello("target", heartbeat=True)
        mirror = await racer.register(puppet.pid, addr, addr + 4 * PAGE)
        await sleeper.register(puppet.pid, addr, addr + 4 * PAGE)
        fault = Fault(mirror=mirror, start=addr, npages=2, write=False, mode=POPULATE)
        first = await racer.request(fault)
        assert isinstance(first.msg, FaultReply)
        entries = bytes(first.bulk[0])
        sync = target.send(SyncRange(pid=puppet.pid, ranges=((addr, addr + 2 * PAGE),), event=1))
        inv = await racer.invalidate(skip=True)
        dma = await racer.request(DmaRead(mirror=mirror, start=addr, npages=2), [entries])
        assert isinstance(dma.msg, Error) and dma.msg.code == ErrorCode.STALE, dma.msg
        racing = [racer.send(fault), racer.send(fault)]  # they wait for the window to close
        racer.send(Ack(n=inv.n))
        # The sleeper never acks: evicted at the 1 s deadline, and the window closes.
        assert isinstance((await target.reply(sync)).msg, Ok)
        for reply in await asyncio.gather(*(racer.reply(r) for r in racing)):
            assert isinstance(reply.msg, FaultReply), reply.msg
    stdout, stderr = await asyncio.wait_for(ctl.communicate(), 30)
    assert ctl.returncode == 0, stderr.decode()
    summary = json.loads(stdout)
    assert summary["output"] == str(out) and summary["faults"] == 3, summary
    # The racer is evicted too once its connection closes (lease expiry), if in time.
    assert summary["stale"] >= 1 and summary["evictions"] in (1, 2) and summary["acks"] >= 1
    doc = json.loads(out.read_text())
    events = check_chrome_trace(doc)
    names = {(e["pid"], e["tid"]): e["args"]["name"]
             for e in doc["traceEvents"] if e["name"] == "thread_name"}  # fmt: skip
    mine = [e for e in events if names[(e["pid"], e["tid"])].startswith(f"mirror {mirror} ")]
    assert {e["pid"] for e in mine} == {puppet.pid}
    faults = sorted((e for e in mine if e["name"] == "fault"), key=lambda e: e["ts"])
    assert len(faults) == 3 and all(f["args"]["result"] == "ok" for f in faults), faults
    invs = [e for e in mine if e["ph"] == "X" and e["cat"] == "invalidations"]
    [window] = [e for e in invs if e["args"]["seq"] == inv.items[0][0]]
    assert window["name"] == "invalidate CLEAR" and window["args"]["evictions"] is True
    assert (window["args"]["start"], window["args"]["end"]) == (hex(addr), hex(addr + 2 * PAGE))
    # The race, on one screen: both late faults began inside the window and ended after it.
    w_end = window["ts"] + window["dur"]
    for late in faults[1:]:
        assert window["ts"] < late["ts"] < w_end <= late["ts"] + late["dur"] + 1, (window, late)
    assert faults[1]["tid"] != faults[2]["tid"]  # concurrent faults: two lanes
    assert window["dur"] >= 900  # µs: held open by the sleeper until its 1 s deadline
    [ack] = [e for e in mine if e["name"] == "ack" and e["args"]["seq"] == window["args"]["seq"]]
    assert window["ts"] <= ack["ts"] <= w_end and ack["tid"] == window["tid"]
    stale = [e for e in events if e["name"] == "STALE" and e["pid"] == puppet.pid]
    assert stale and stale[0]["args"]["why"] == "an INVALIDATE was pending"
    refused = [e for e in mine if e["name"] == "refused STALE"]
    assert refused and window["ts"] <= refused[0]["ts"] <= w_end
    [evicted] = [e for e in events if e["name"] == "evicted" and "no ACK" in e["args"]["reason"]]
    assert "sleeper" in names[(evicted["pid"], evicted["tid"])]
    assert "no ACK" in evicted["args"]["reason"]


async def test_trace_bounds_and_one_at_a_time(hmmd):
    async with raw_peer(hmmd.endpoint, 10) as peer:
        for bad in (Trace(duration_ms=0), Trace(duration_ms=10, max_events=0)):
            env = await peer.request(bad)
            assert isinstance(env.msg, Error) and env.msg.code == ErrorCode.EINVAL, env.msg
        env = await peer.request(Trace(duration_ms=600_001))
        assert isinstance(env.msg, Error) and env.msg.code == ErrorCode.TOO_LARGE, env.msg
        await peer.hello("refused", heartbeat=True)
        running = peer.send(Trace(duration_ms=300, max_events=2))
        await tracing(peer)
        for mirror in (7, 8, 9):  # three ERROR events; the ring keeps the newest two
            # Header ids may use all 64 bits: the last one's lands in the ``id`` column.
            sent = peer.send(Unregister(mirror=mirror), id=(1 << 64) - mirror)
            env = await peer.reply(sent)
            assert isinstance(env.msg, Error) and env.msg.code == ErrorCode.NO_MIRROR
        env = await peer.reply(running)
        assert isinstance(env.msg, TraceReply), env.msg
        assert (env.msg.count, env.msg.dropped) == (2, 1), env.msg
        assert env.msg.duration_ns >= 250_000_000 and env.msg.names == {"session:1": "refused"}
        rows = np.frombuffer(env.bulk[0], "<u8").reshape(-1, len(TRACE_COLUMNS))
        assert [(r[1], r[2], r[5], r[8]) for r in rows.tolist()] == [
            (TraceKind.ERROR, 8, (1 << 64) - 8, ErrorCode.NO_MIRROR),
            (TraceKind.ERROR, 9, (1 << 64) - 9, ErrorCode.NO_MIRROR),
        ]  # fmt: skip
        assert len(env.bulk[0]) == env.msg.count * len(TRACE_COLUMNS) * 8


def test_hmmctl_trace_usage_errors_are_one_line(hmmd, tmp_path):
    for args, code, text in (
        (["--seconds", "601"], 2, "--seconds: at most 600"),
        (["--max-events", "0"], 2, "--max-events"),
        (["--seconds", "0.1", "-o", str(tmp_path / "no" / "such" / "dir.json")], 1,
         "cannot write"),
    ):  # fmt: skip
        out = subprocess.run(
            [*HMMCTL, "trace", *args, "--endpoint", hmmd.endpoint],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert out.returncode == code, (args, out.stderr)
        assert out.stderr.startswith("hmmctl: ") and out.stderr.count("\n") == 1, out.stderr
        assert text in out.stderr, out.stderr


def test_only_root_or_an_inspect_grant_may_trace(tmp_path: Path):
    """A tcp:// peer is never root: without an inspect grant, the trace is refused."""
    with curve_hmmd(tmp_path) as rig:
        out = subprocess.run(
            [*HMMCTL, "trace", "--seconds", "0.2", "-o", str(tmp_path / "t.json"),
             "--endpoint", rig.endpoint, "--server-key", rig.server_key,
             "--client-key", rig.client_key],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
            env={**os.environ, **NO_KEY_ENV},
        )  # fmt: skip
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "PERMISSION_DENIED" in out.stderr or "root or an inspect grant" in out.stderr
    assert not (tmp_path / "t.json").exists()
