"""``hmmctl status``, ``mms``, ``mirrors`` and ``top``: questions to a running hmmd, as
aligned text (``top`` full screen on a terminal: ``liveview``) or (``-j``) JSON; and what
every hmmctl command shares: ``Refused``, ``fail`` and one-line JSON output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from hmmirror.client.curve import CLIENT_KEY_ENV, SERVER_KEY_ENV, CertificateError, CurveKeys
from hmmirror.client.errors import AgentError
from hmmirror.tools import ackhistogram
from hmmirror.tools.liveview import Screen, rate, read_hmmd, table, top_screen
from hmmirror.transport.peer import printable
from hmmirror.transport.settings import EXIT_FAILURE, EXIT_USAGE

T = TypeVar("T")
_WATCHED = {0: "proc", 1: "proc+uffd", 2: "proc+uffd+strict"}
_WRITES = {0: "-", 1: "watch", 2: "strict", 3: "strict"}


class Refused(Exception):
    """A command's failure, which ``main`` prints: the line and the exit status."""

    def __init__(self, line: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(line)
        self.code = code


def fail(message: str, code: int = EXIT_FAILURE) -> int:
    """Say what went wrong, in one line on stderr; return the exit status."""
    print(f"hmmctl: {message}", file=sys.stderr)
    return code


def emit(value: object) -> None:
    """``value`` as one line of JSON on stdout, flushed (``top`` streams them)."""
    print(json.dumps(value, separators=(", ", ": ")), flush=True)


def load_keys(server_key: str, client_key: str, server_flag: str) -> CurveKeys | None:
    """CURVE keys from a server certificate and our secret one: None when neither is
    given, both when one is, loadable; Refused (exit 2) otherwise."""
    if not (server_key or client_key):
        return None
    if not (server_key and client_key):
        raise Refused(
            f"{server_flag} and --client-key go together: give both, or neither", EXIT_USAGE
        )
    try:
        return CurveKeys.load(server_key, client_key)
    except (CertificateError, OSError, ValueError) as exc:
        raise Refused(f"{server_flag}/--client-key: {exc}", EXIT_USAGE) from exc


def _curve(args: argparse.Namespace, endpoint: str = "") -> CurveKeys | None:
    """The CURVE keys for a ``tcp://`` hmmd, ``endpoint`` or ``--endpoint``'s (None: none
    given, or an ipc:// hmmd)."""
    if not (endpoint or args.endpoint).startswith("tcp://"):
        return None
    return load_keys(args.server_key, args.client_key, "--server-key")


def _unreachable(
    args: argparse.Namespace, curve: CurveKeys | None, exc: AgentError, endpoint: str = ""
) -> str:
    """What to say when hmmd did not answer: the error, and what to check when no keys
    were given for a tcp:// hmmd (which ignores such a client, and only logs why)."""
    if curve is not None or not (endpoint or args.endpoint).startswith("tcp://"):
        return str(exc)
    return (
        f"{exc} (no CURVE keys given: a tcp:// hmmd that is not insecure ignores such a "
        f"client; give --server-key (its .key) and --client-key (your .key_secret), or set "
        f"{SERVER_KEY_ENV} and {CLIENT_KEY_ENV})"
    )


def _ask_hmmd(
    args: argparse.Namespace,
    ask: Callable[[CurveKeys | None], Coroutine[Any, Any, T]],
    endpoint: str = "",
) -> T:
    """One question to hmmd (``endpoint``, else ``--endpoint``'s), with the keys given;
    Refused if it fails."""
    curve = _curve(args, endpoint)
    try:
        return asyncio.run(ask(curve))
    except AgentError as exc:
        raise Refused(_unreachable(args, curve, exc, endpoint)) from exc


def _ask_each(
    args: argparse.Namespace,
    ask: Callable[[str, CurveKeys | None], Coroutine[Any, Any, T]],
) -> tuple[list[tuple[str, T]], int]:
    """The same question to each hmmd ``--endpoint`` names, in order: the answers, and the
    exit status (1 if one did not answer, which is said in one line and skipped; Refused,
    as for one, when only one is named)."""
    answers: list[tuple[str, T]] = []
    code = 0
    for endpoint in args.endpoints:
        try:
            answer = _ask_hmmd(args, functools.partial(ask, endpoint), endpoint)
        except Refused as exc:
            if len(args.endpoints) == 1:
                raise
            code = fail(str(exc), exc.code)
            continue
        answers.append((endpoint, answer))
    return answers, code


def status(args: argparse.Namespace) -> int:
    """``hmmctl status``: the daemon's figures, one per line (``-j``: one object); given
    several hmmds, each one's in turn (``-j``: one object per line)."""
    from hmmirror.client.session import status as ask_status

    answers, code = _ask_each(args, lambda where, curve: ask_status(where, args.timeout, curve))
    for n, (endpoint, stats) in enumerate(answers):
        if len(args.endpoints) > 1 and not args.json:
            print(f"{chr(10) if n else ''}== hmmd at {endpoint}")
        _show_status(args, stats)
    return code


def _show_status(args: argparse.Namespace, stats: dict[str, int | float | str]) -> None:
    """One hmmd's figures, as ``status`` prints them."""
    text = stats.get("ack_histogram")
    buckets: ackhistogram.Buckets | None = None
    if isinstance(text, str):
        with contextlib.suppress(ValueError):  # another hmmd's format: shown as it came
            buckets = ackhistogram.parse(text)
    if args.json:
        parsed = {"ack_histogram": ackhistogram.as_json(str(text))} if buckets is not None else {}
        emit({**stats, **parsed})  # parsed in its place among the keys
        return
    shown = {k: v for k, v in stats.items() if k != "ack_histogram" or buckets is None}
    width = max(len(k) for k in shown)
    for key, value in shown.items():  # hmmd's strings may quote what a peer or target chose
        print(f"{printable(key):<{width}}  {printable(str(value))}")
    if buckets is not None:
        print(f"\nack round trip since hmmd started ({ackhistogram.summary(buckets)}):")
        for line in ackhistogram.draw(buckets, 40, ackhistogram.block_for(sys.stdout.encoding)):
            print(line)


def inventory(args: argparse.Namespace) -> int:
    """``hmmctl mms`` and ``hmmctl mirrors``: a table, or (``-j``) one object per row;
    given several hmmds, their rows together, each naming its hmmd (HMMD, ``endpoint``)."""
    from hmmirror.client.session import inventory as ask_inventory

    answers, code = _ask_each(args, lambda where, curve: ask_inventory(where, args.timeout, curve))
    several = len(args.endpoints) > 1
    rows: list[dict[str, object]] = []
    for endpoint, (mms, mirrors) in answers:
        at = {"endpoint": endpoint} if several else {}
        if args.command == "mms":
            rows += [
                {"pid": m["pid"], "start_time": m["start_time"], "seq": m["seq"],
                 "active": m["active"], "mirrors": m["mirrors"],
                 "watched": _WATCHED.get(m["uffd"], "?"), **at} for m in mms
            ]  # fmt: skip
        else:
            rows += [
                {"mirror": m["mirror"], "agent": m["agent"], "session": m["session"],
                 "pid": m["pid"], "lo": int(m["lo"]), "hi": int(m["hi"]),
                 "held_pages": m["held_pages"], "access": "rw" if int(m["access"]) & 2 else "r",
                 "writes": _WRITES.get(int(m["flags"]), "?"), **at} for m in mirrors
            ]  # fmt: skip
    if args.json:
        for row in rows:
            emit(row)
        return code
    if args.command == "mirrors":
        heads: tuple[str, ...] = ("MIRROR", "AGENT", "SESSION", "PID", "RANGE", "PAGES HELD",
                                  "ACCESS", "WRITES")  # fmt: skip
        cells = [[r["mirror"], r["agent"], r["session"], r["pid"],
                  f"{r['lo']:#x}-{r['hi']:#x}", r["held_pages"], r["access"], r["writes"],
                  *([r["endpoint"]] if several else [])]
                 for r in rows]  # fmt: skip
    else:
        heads = ("PID", "START", "SEQ", "ACTIVE", "MIRRORS", "WATCHED BY")
        cells = [list(r.values()) for r in rows]
    print(table((*heads, "HMMD") if several else heads, cells))
    return code


def top_until_interrupted(args: argparse.Namespace) -> int:
    """``hmmctl top``, which Ctrl-C ends normally."""
    try:
        return asyncio.run(_top(args))
    except KeyboardInterrupt:
        return 0


_TOP_HEADS = ("TIME", "SESS", "MMS", "MIRRORS", "INVAL/S", "FAULT/S", "DMA/S", "ACK P50 US",
              "ACK P99 US", "EVICT", "STALE")  # fmt: skip


async def _top(args: argparse.Namespace) -> int:
    """``hmmctl top``: full screen on a terminal (``liveview``); else, and with ``-j`` or
    ``--count``, one line per interval, with rates from successive status figures."""
    from hmmirror.client.session import status as ask_status

    curve = _curve(args)
    screen = Screen(sys.stdout)
    if not args.json and args.count == 0 and screen.usable:
        try:
            await top_screen(
                screen, lambda: read_hmmd(args.endpoint, args.timeout, curve), args.interval,
                f"hmmctl top  {args.endpoint}",
            )  # fmt: skip
        except AgentError as exc:
            return fail(_unreachable(args, curve, exc))
        return 0
    if not args.json:
        print("  ".join(_TOP_HEADS), flush=True)
    prev: dict[str, int | float | str] | None = None
    shown = 0
    while args.count == 0 or shown < args.count:
        try:
            now = await ask_status(args.endpoint, args.timeout, curve)
        except AgentError as exc:
            return fail(_unreachable(args, curve, exc))
        if prev is not None:
            row: dict[str, Any] = {
                "ts": round(time.time(), 3), "sessions": now["sessions"], "mms": now["mms"],
                "mirrors": now["mirrors"],
                "invalidations_per_s": rate(prev, now, "invalidations"),
                "faults_per_s": rate(prev, now, "faults"),
                "dma_per_s": rate(prev, now, "dma_reads", "dma_writes"),
                "ack_p50_us": now.get("ack_p50_us"), "ack_p99_us": now.get("ack_p99_us"),
                "evictions": now.get("evictions"), "stale": now.get("stale"),
            }  # fmt: skip
            if args.json:
                emit(row)
            else:
                print(_top_line(row), flush=True)
            shown += 1
        prev = now
        await asyncio.sleep(args.interval)
    return 0


def _top_line(row: dict[str, Any]) -> str:
    """One ``top`` row as text under ``_TOP_HEADS``: the clock, then whole rates."""
    cells = [time.strftime("%H:%M:%S", time.localtime(row["ts"]))]
    for key, value in list(row.items())[1:]:
        if value is None:
            cells.append("-")
        elif key.endswith("_per_s"):
            cells.append(f"{value:.0f}")
        else:
            cells.append(str(value))
    return "  ".join(cells)
