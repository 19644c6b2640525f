"""``hmmctl trace``: record hmmd's timeline for a while and write it as a Chrome trace event
JSON file, which Perfetto (ui.perfetto.dev) and chrome://tracing open.

hmmd records (SPEC §4.8) faults, invalidations, acks, STALE refusals and evictions; this
module asks for them (``trace``, root or an ``inspect`` grant) and lays them out: one
process per target pid, and under it, per mirror, a track of its faults (a slice from the
request to the reply) and a track of its invalidations (a slice from the window's start to
its last ACK, with seq, start, end and event; an instant per ACK of that mirror and per
eviction); the mm's own track holds the STALE refusals. Slices on one track never overlap
(viewers drop slices that are not nested): overlapping ones go to a second lane of the
same kind, so a fault racing an invalidation shows as two slices side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hmmirror.client.channel import Channel
from hmmirror.client.curve import CurveKeys
from hmmirror.client.errors import AgentError, RemoteError
from hmmirror.proto.errors import ErrorCode
from hmmirror.proto.messages import (
    MAX_TRACE_EVENTS,
    MAX_TRACE_MS,
    TRACE_COLUMNS,
    Event,
    Status,
    StatusReply,
    Trace,
    TraceKind,
    TraceReply,
)
from hmmirror.tools.ctlinspect import Refused, _curve, _unreachable, emit
from hmmirror.transport.settings import EXIT_USAGE

#: How often hmmctl speaks while it waits: hmmd drops a silent connection without a session.
KEEPALIVE = 2.0
_STALE_WHY = {0: "an INVALIDATE was pending", 1: "pagemap changed", 2: "changed mid-copy"}
_FAULTS, _INVALIDATIONS = "faults", "invalidations"


class _Tracing(Channel):
    """The connection to hmmd that asks for the trace."""

    what = "hmmd"


async def record(
    endpoint: str, seconds: float, max_events: int, timeout: float, curve: CurveKeys | None
) -> tuple[TraceReply, np.ndarray[Any, np.dtype[np.uint64]]]:
    """Ask hmmd at ``endpoint`` for ``seconds`` of its timeline; the reply and its rows."""
    if curve is None and endpoint.startswith("tcp://"):
        curve = CurveKeys.from_env()
    channel = _Tracing(endpoint, timeout, curve)

    async def keepalive() -> None:
        while True:
            await asyncio.sleep(KEEPALIVE)
            with contextlib.suppress(RemoteError):
                await channel.call(Status(), StatusReply, timeout=timeout)

    pinger = asyncio.ensure_future(keepalive())
    try:
        msg = Trace(duration_ms=max(1, round(seconds * 1000)), max_events=max_events)
        reply, bulk = await channel.exchange(msg, TraceReply, timeout=seconds + timeout)
    finally:
        pinger.cancel()
        channel._close_socket()
    rows = np.frombuffer(bulk[0], "<u8").reshape(-1, len(TRACE_COLUMNS)) if bulk else None
    return reply, rows if rows is not None else np.zeros((0, len(TRACE_COLUMNS)), "<u8")


@dataclass
class _Track:
    """One lane of one kind of one mirror: its tid and when its last slice ends."""

    tid: int
    name: str
    sort: int
    end_ns: int = -1


@dataclass
class _Layout:
    """Processes and tracks (tids) as events claim them."""

    names: dict[str, int | float | str]
    tracks: dict[tuple[int, int, str, int], _Track] = field(default_factory=dict)
    agents: dict[int, int] = field(default_factory=dict)
    """Each mirror's session, as its events say."""
    _next_tid: dict[int, int] = field(default_factory=dict)

    def track(self, pid: int, mirror: int, kind: str, lane: int = 0) -> _Track:
        """The track ``lane`` of ``kind`` for ``mirror`` under ``pid`` (made on first use)."""
        key = (pid, mirror, kind, lane)
        found = self.tracks.get(key)
        if found is None:
            tid = self._next_tid.get(pid, 1)
            self._next_tid[pid] = tid + 1
            if mirror == 0:
                name, sort = f"mm {pid} (STALE refusals)", 0
            else:
                session = self.agents.get(mirror, 0)
                agent = self.names.get(f"session:{session}", "?")
                name = f"mirror {mirror} · {agent} (session {session}) · {kind}"
                name += f" #{lane + 1}" if lane else ""
                sort = mirror * 1000 + (0 if kind == _FAULTS else 500) + lane
            found = self.tracks[key] = _Track(tid, name, sort)
        return found

    def lane(self, pid: int, mirror: int, kind: str, begin: int, end: int) -> _Track:
        """The first lane of ``kind`` free at ``begin``; it is busy until ``end`` now."""
        lane = 0
        while True:
            track = self.track(pid, mirror, kind, lane)
            if track.end_ns <= begin:
                track.end_ns = end
                return track
            lane += 1

    def renumber(self, events: list[dict[str, Any]]) -> None:
        """Give each process's tracks tids in display order (mm, then each mirror's faults,
        then its invalidations): viewers that ignore ``thread_sort_index`` order by tid."""
        order = sorted(self.tracks.items(), key=lambda kv: (kv[0][0], kv[1].sort))
        new: dict[tuple[int, int], int] = {}
        count: dict[int, int] = {}
        for (pid, *_), track in order:
            count[pid] = new[(pid, track.tid)] = count.get(pid, 0) + 1
        for track_key, track in self.tracks.items():
            track.tid = new[(track_key[0], track.tid)]
        for event in events:
            event["tid"] = new[(event["pid"], event["tid"])]

    def metadata(self) -> Iterator[dict[str, Any]]:
        """Process and thread names and orders."""
        for pid in sorted({key[0] for key in self.tracks}):
            label = f"pid {pid}" if pid else "hmmd"
            yield {"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                   "args": {"name": label}}  # fmt: skip
            yield {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                   "args": {"sort_index": pid}}  # fmt: skip
        for (pid, *_), track in sorted(self.tracks.items(), key=lambda kv: kv[1].sort):
            yield {"name": "thread_name", "ph": "M", "pid": pid, "tid": track.tid,
                   "args": {"name": track.name}}  # fmt: skip
            yield {"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": track.tid,
                   "args": {"sort_index": track.sort}}  # fmt: skip


def _us(ns: int) -> float:
    """Chrome trace time (microseconds) from nanoseconds."""
    return round(ns / 1000, 3)


def _event_name(value: int) -> str:
    """An invalidation event's name (``Event``), or its number."""
    try:
        return Event(value).name
    except ValueError:
        return str(value)


def _code_name(value: int) -> str:
    """An error code's name, or its number."""
    try:
        return ErrorCode(value).name
    except ValueError:
        return str(value)


Row = tuple[int, ...]
#: A slice to lay out: begin, end (ns), name, args, its first row, its kind of track.
Slice = tuple[int, int, str, dict[str, Any], Row, str]


def _fault_slices(faults: dict[tuple[int, int], Row], ends: dict[tuple[int, int], Row],
                  duration_ns: int) -> Iterator[Slice]:  # fmt: skip
    """A slice per fault, from its request to its reply or error (or the trace's end)."""
    for key, row in faults.items():
        t, start, end, write = row[0], row[6], row[7], row[8]
        args: dict[str, Any] = {
            "start": hex(start), "end": hex(end), "npages": (end - start) >> 12,
            "write": bool(write), "id": row[5],
        }  # fmt: skip
        done = ends.get(key)
        if done is None:
            args["unfinished"], stop = True, duration_ns
        elif done[1] == TraceKind.FAULT_REPLY:
            args["seq"], args["result"], stop = done[8], "ok", done[0]
        else:
            args["result"], stop = _code_name(done[8]), done[0]
        yield t, max(stop, t), "fault", args, row, _FAULTS


def _invalidation_slices(
    opened: dict[tuple[int, int], list[Row]], closed: dict[tuple[int, int], Row], duration_ns: int
) -> Iterator[Slice]:
    """A slice per invalidation and mirror, from its start to its last ACK (the window's
    close) or the trace's end."""
    for (_, seq), begun in opened.items():
        end_row = closed.get((begun[0][4], seq))
        for row in begun:
            t, start, end, event = row[0], row[6], row[7], row[8]
            args = {"seq": seq, "start": hex(start), "end": hex(end), "event": _event_name(event)}
            if end_row is None:
                args["unfinished"], stop = True, duration_ns
            else:
                stop = end_row[0]
                if end_row[8]:
                    args["evictions"] = True
            yield t, max(stop, t), f"invalidate {args['event']}", args, row, _INVALIDATIONS


def _instant(row: Row, layout: _Layout, lanes: dict[tuple[int, int, int], _Track],
             names: dict[str, int | float | str], faults: dict[tuple[int, int], Row]
             ) -> dict[str, Any] | None:  # fmt: skip
    """The instant event of an ACK, STALE, eviction or a refusal that ended no fault."""
    t, kind, mirror, session, pid, rid, start, end, arg = row
    args: dict[str, Any]
    if kind == TraceKind.ACK:
        track = lanes.get((pid, mirror, rid)) or layout.track(pid, mirror, _INVALIDATIONS)
        name, tid, args = "ack", track.tid, {"seq": rid, "n": arg}
    elif kind == TraceKind.STALE:
        why = _STALE_WHY.get(arg, str(arg))
        name, tid = "STALE", layout.track(pid, 0, "mm").tid
        args = {"start": hex(start), "end": hex(end), "why": why}
    elif kind == TraceKind.EVICT:
        reason = names.get(f"evict:{rid}", "(reason not kept)")
        name, tid = "evicted", layout.track(pid, mirror, _INVALIDATIONS).tid
        args = {"session": session, "reason": reason}
    elif kind == TraceKind.ERROR and (session, rid) not in faults:
        name, tid = f"refused {_code_name(arg)}", layout.track(pid, mirror, _FAULTS).tid
        args = {"id": rid, "start": hex(start), "end": hex(end)}
    else:
        return None
    return {"name": name, "cat": name.split()[0], "ph": "i", "s": "t", "ts": _us(t),
            "pid": pid, "tid": tid, "args": args}  # fmt: skip


def chrome_trace(
    rows: np.ndarray[Any, np.dtype[np.uint64]],
    names: dict[str, int | float | str],
    duration_ns: int,
    dropped: int = 0,
) -> dict[str, Any]:
    """The Chrome trace event JSON object for ``rows`` of ``TRACE_COLUMNS``."""
    table = sorted((tuple(int(v) for v in row) for row in rows), key=lambda r: r[0])
    layout = _Layout(names)
    faults: dict[tuple[int, int], Row] = {}
    ends: dict[tuple[int, int], Row] = {}
    opened: dict[tuple[int, int], list[Row]] = {}
    closed: dict[tuple[int, int], Row] = {}
    for row in table:
        kind, mirror, session, pid, rid = row[1], row[2], row[3], row[4], row[5]
        if mirror and session:
            layout.agents.setdefault(mirror, session)
        if kind == TraceKind.FAULT:
            faults[(session, rid)] = row
        elif kind in (TraceKind.FAULT_REPLY, TraceKind.ERROR) and (session, rid) in faults:
            ends.setdefault((session, rid), row)
        elif kind == TraceKind.INVALIDATE:
            opened.setdefault((pid, rid), []).append(row)
        elif kind == TraceKind.INVALIDATE_END:
            closed.setdefault((pid, rid), row)
    out: list[dict[str, Any]] = []
    lanes: dict[tuple[int, int, int], _Track] = {}
    # Slices in order of their start (the longer first), each on the first lane free then.
    slices = [*_fault_slices(faults, ends, duration_ns),
              *_invalidation_slices(opened, closed, duration_ns)]  # fmt: skip
    for t, stop, name, args, row, category in sorted(slices, key=lambda s: (s[0], -s[1])):
        pid, mirror = row[4], row[2]
        track = layout.lane(pid, mirror, category, t, stop)
        if category == _INVALIDATIONS:
            lanes[(pid, mirror, row[5])] = track
        out.append({"name": name, "cat": category, "ph": "X", "ts": _us(t),
                    "dur": _us(stop - t), "pid": pid, "tid": track.tid, "args": args})  # fmt: skip
    for row in table:
        instant = _instant(row, layout, lanes, names, faults)
        if instant is not None:
            out.append(instant)
    layout.renumber(out)
    other = {"source": "hmmctl trace", "duration_s": duration_ns / 1e9, "events": len(table),
             "dropped": dropped}  # fmt: skip
    return {"traceEvents": [*layout.metadata(), *out], "displayTimeUnit": "ns", "otherData": other}


def trace(args: argparse.Namespace) -> int:
    """``hmmctl trace``: record for ``--seconds``, write ``--output``, say what it holds."""
    if args.seconds > MAX_TRACE_MS / 1000:
        raise Refused(
            f"--seconds: at most {MAX_TRACE_MS // 1000}, got {args.seconds:g}", EXIT_USAGE
        )
    if args.max_events > MAX_TRACE_EVENTS:
        raise Refused(
            f"--max-events: at most {MAX_TRACE_EVENTS}, got {args.max_events}", EXIT_USAGE
        )
    curve = _curve(args)
    try:
        reply, rows = asyncio.run(
            record(args.endpoint, args.seconds, args.max_events, args.timeout, curve)
        )
    except RemoteError as exc:
        raise Refused(f"hmmd refused the trace: {exc}") from exc
    except AgentError as exc:
        raise Refused(_unreachable(args, curve, exc)) from exc
    doc = chrome_trace(rows, reply.names, reply.duration_ns, reply.dropped)
    try:
        with open(args.output, "w", encoding="utf-8") as out:
            json.dump(doc, out, separators=(",", ":"))
    except OSError as exc:
        raise Refused(f"cannot write {args.output}: {exc.strerror or exc}") from exc
    kinds = [int(k) for k in rows[:, 1]] if len(rows) else []
    summary = {
        "output": args.output,
        "seconds": round(reply.duration_ns / 1e9, 3),
        "events": reply.count,
        "dropped": reply.dropped,
        "faults": kinds.count(TraceKind.FAULT),
        "invalidations": len(
            {(int(r[4]), int(r[5])) for r in rows if r[1] == TraceKind.INVALIDATE}
        ),
        "acks": kinds.count(TraceKind.ACK),
        "stale": kinds.count(TraceKind.STALE),
        "evictions": kinds.count(TraceKind.EVICT),
    }
    if args.json:
        emit(summary)
    else:
        more = f" ({reply.dropped} older ones dropped: raise --max-events)" if reply.dropped else ""
        print(
            f"wrote {reply.count} events{more} to {args.output}: {summary['faults']} faults, "
            f"{summary['invalidations']} invalidations, {summary['acks']} acks, "
            f"{summary['stale']} STALE, {summary['evictions']} evictions; open it in "
            "https://ui.perfetto.dev or chrome://tracing",
            file=sys.stderr if args.output == "/dev/stdout" else sys.stdout,
        )
    return 0


__all__ = ["MAX_TRACE_EVENTS", "chrome_trace", "record", "trace"]
