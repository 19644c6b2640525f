"""The ``hmmctl`` command line: inspect a running hmmd or hm-agent, make keys, run the demo
or the coherence checker (``hmmctl check``).

Exit codes: 0 success, 1 failure (daemon or agent unreachable, violations
found, keys that exist already, the daemon's distribution missing for ``demo``
and ``check``), 2 usage error (a malformed endpoint, duration or count, an
unusable key file). Every error is one line on stderr, ``hmmctl: ...``.
``HMMIRROR_ENDPOINT`` sets the default hmmd endpoint, ``HMMIRROR_AGENT`` the
default hm-agent endpoint, ``HMMIRROR_SERVER_KEY`` and ``HMMIRROR_CLIENT_KEY`` the
CURVE certificates for a ``tcp://`` hmmd, ``HMMIRROR_AGENT_KEY`` and
``HMMIRROR_CLIENT_KEY`` those ``stat mr`` uses.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from importlib.metadata import version
from typing import Any, TypeVar

from hmmirror.client.curve import CLIENT_KEY_ENV, SERVER_KEY_ENV, CertificateError, CurveKeys
from hmmirror.client.errors import AgentError
from hmmirror.transport.settings import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    flag,
    parse_duration,
    parse_endpoint,
    version_line,
    whole_number,
)

T = TypeVar("T")

DEFAULT_ENDPOINT = "ipc:///run/hmmirror/hmmd.sock"
DEFAULT_AGENT = "tcp://127.0.0.1:18515"
#: ``rdma stat mr``'s counters, in the order it prints them.
MR_COUNTERS = (
    "page_faults",
    "page_faults_handled",
    "page_invalidations",
    "page_invalidations_handled",
    "page_prefetch",
)


def _duration(name: str, minimum: float = 0.001) -> Callable[[str], float]:
    """A flag's duration in seconds (``2``, ``2s``, ``250ms``), at least ``minimum``."""
    return flag(lambda text, label: parse_duration(text, label, minimum), name)


def _parser() -> argparse.ArgumentParser:
    """Build the ``hmmctl`` argument parser and its subcommands."""
    parser = Parser(
        prog="hmmctl",
        description="Inspect hmmirror's daemon, or run the self-contained demo.",
    )
    parser.add_argument(
        "--endpoint",
        type=flag(parse_endpoint, "--endpoint"),
        default=os.environ.get("HMMIRROR_ENDPOINT", DEFAULT_ENDPOINT),
        help="hmmd endpoint, ipc://PATH or tcp://HOST:PORT (default $HMMIRROR_ENDPOINT or "
        "%(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=_duration("--timeout"),
        default=2.0,
        metavar="DURATION",
        help="how long to wait for hmmd: seconds, or 500ms, 2s (default 2)",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("status", help="show the daemon's state and figures")
    sub.add_parser("mms", help="list the processes hmmd watches, and how")
    sub.add_parser("mirrors", help="list every mirror: agent, process, range, pages held")
    top = sub.add_parser(
        "top", help="a live line per interval: rates, ack latency, evictions (Ctrl-C stops)"
    )
    top.add_argument(
        "--interval", type=_duration("--interval"), default=1.0, help="seconds between lines (1)"
    )
    top.add_argument(
        "--count", type=flag(whole_number(0), "--count"), default=0,
        help="lines to print (0: until Ctrl-C)",
    )  # fmt: skip
    keys = sub.add_parser("keys", help="CURVE keys for TCP connections to hmmd")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    gen = keys_sub.add_parser(
        "generate", help="write NAME.key (public) and NAME.key_secret (mode 0600) into DIR"
    )
    gen.add_argument("directory", metavar="DIR")
    gen.add_argument("name", metavar="NAME", help="a file name: letters, digits, _ . -")
    gen.add_argument(
        "--force", action="store_true", help="replace NAME's keys if they exist (default: refuse)"
    )
    stat = sub.add_parser("stat", help="device statistics of an hm-agent, as `rdma stat` shows")
    stat_sub = stat.add_subparsers(dest="object", metavar="OBJECT", required=True)
    stat_mr = stat_sub.add_parser("mr", help="per-MR ODP counters, in the shape of `rdma stat mr`")
    stat_mr.add_argument(
        "--agent",
        type=flag(parse_endpoint, "--agent"),
        default=os.environ.get("HMMIRROR_AGENT", DEFAULT_AGENT),
        help="hm-agent endpoint (default $HMMIRROR_AGENT or %(default)s)",
    )
    stat_mr.add_argument(
        "--agent-key",
        metavar="FILE",
        default=os.environ.get("HMMIRROR_AGENT_KEY", ""),
        help="the agent's public CURVE certificate (a tcp:// agent; default $HMMIRROR_AGENT_KEY)",
    )
    stat_mr.add_argument(
        "--client-key",
        metavar="FILE",
        default=os.environ.get("HMMIRROR_CLIENT_KEY", ""),
        help="our secret CURVE certificate, allowed and granted by the agent "
        "(default $HMMIRROR_CLIENT_KEY)",
    )
    stat_mr.add_argument("-j", "--json", action="store_true", help="JSON, as `rdma -j stat mr`")
    stat_mr.add_argument(
        "-d", "--details", action="store_true", help="also show each MR's rkey, pid and range"
    )
    demo = sub.add_parser(
        "demo",
        help="start hmmd, a churning target and two agents; show live counters and a report",
    )
    demo.add_argument(
        "--duration", type=_duration("--duration"), default=20.0,
        help="seconds of churn (default 20)",
    )  # fmt: skip
    demo.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    demo.add_argument(
        "--check-duration",
        type=_duration("--check-duration", minimum=0),
        default=8.0,
        help="seconds of the coherence checker's rounds after the demo (default 8; 0 skips it)",
    )
    _check_parser(sub)
    sub.add_parser("version", help="print versions and exit")
    return parser


def _check_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """``hmmctl check``: the coherence checker (see ``hmmirror.tools.check``)."""
    from hmmirror.tools.check.scenarios import SCENARIOS

    names = "\n".join(f"  {name:<13} {s.help}" for name, s in SCENARIOS.items())
    check = sub.add_parser(
        "check",
        help="run a seeded random workload under hmmd and judge it with two oracles",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Start a private hmmd, a target that mmaps, munmaps, mprotects, madvises, mremaps,\n"
            "maps over, forks and writes at random (seeded), and N agent processes that fault,\n"
            "prefetch, READ, WRITE and run atomics through ODP MRs. At quiescent points every\n"
            "VALID agent entry must equal /proc/PID/pagemap (read by the checker itself); every\n"
            "READ must return a page stamp that was live at some moment of that READ.\n"
            "Exit status 1 on any violation; replay a failure with its --seed and --scenario.\n\n"
            f"scenarios:\n{names}"
        ),
    )
    check.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    check.add_argument(
        "--duration", type=_duration("--duration"), default=20.0,
        help="seconds of rounds, after start-up (20)",
    )  # fmt: skip
    check.add_argument(
        "--ops", type=flag(whole_number(1), "--ops"), default=5000,
        help="most target operations (5000)",
    )  # fmt: skip
    check.add_argument(
        "--agents", type=flag(whole_number(1), "--agents"), default=3,
        help="agent processes (default 3)",
    )  # fmt: skip
    check.add_argument(
        "--scenario", default="none", metavar="NAME",
        help="fault to inject (default none; 'list' lists them)",
    )  # fmt: skip
    check.add_argument(
        "--ack-deadline", type=_duration("--ack-deadline"), default=1.0,
        help="hmmd's ack deadline, seconds (1)",
    )  # fmt: skip
    check.add_argument("--keep", action="store_true", help="keep the run's logs and say where")
    check.add_argument("-q", "--quiet", action="store_true", help="only the report")


def _fail(message: str, code: int = EXIT_FAILURE) -> int:
    """Say what went wrong, in one line on stderr; return the exit status."""
    print(f"hmmctl: {message}", file=sys.stderr)
    return code


def _missing_daemon(command: str) -> int | None:
    """EXIT_FAILURE, said, when ``command`` cannot run for want of hmmd here; else None.

    The demo and the checker start an hmmd of their own (``python -m hmmirror.daemon``);
    an install of the tools beside the client only has none to start.
    """
    if importlib.util.find_spec("hmmirror.daemon") is not None:
        return None
    return _fail(
        f"{command} starts an hmmd of its own, and hmmd (the hmmirror-daemon distribution) "
        f"is not installed for {sys.executable}; install it, or run {command} where it is"
    )


def _demo(args: argparse.Namespace) -> int:
    """``hmmctl demo``."""
    missing = _missing_daemon("demo")
    if missing is not None:
        return missing
    from hmmirror.testing.hmmd import HmmdStartError
    from hmmirror.tools.demo import main as demo_main

    try:
        return demo_main(args.duration, args.seed, args.check_duration)
    except HmmdStartError as exc:  # its log's last line says why
        last = (str(exc).strip().splitlines() or ["?"])[-1]
        return _fail(f"demo: cannot start hmmd: {last}")


class _Refused(Exception):
    """A command's failure, which ``main`` prints: the line and the exit status."""

    def __init__(self, line: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(line)
        self.code = code


def _curve(args: argparse.Namespace) -> CurveKeys | None:
    """The CURVE keys the environment names for a ``tcp://`` hmmd (None: none, or ipc://)."""
    if not args.endpoint.startswith("tcp://"):
        return None
    try:
        return CurveKeys.from_env()
    except CertificateError as exc:
        raise _Refused(f"{SERVER_KEY_ENV}/{CLIENT_KEY_ENV}: {exc}", EXIT_USAGE) from exc


def _unreachable(args: argparse.Namespace, curve: CurveKeys | None, exc: AgentError) -> str:
    """What to say when hmmd did not answer: the error, and what to check when no keys
    were given for a tcp:// hmmd (which ignores such a client, and only logs why)."""
    if curve is not None or not args.endpoint.startswith("tcp://"):
        return str(exc)
    return (
        f"{exc} (no CURVE keys given: a tcp:// hmmd that is not insecure ignores such a "
        f"client; set {SERVER_KEY_ENV} to its .key and {CLIENT_KEY_ENV} to your .key_secret)"
    )


def _ask_hmmd(
    args: argparse.Namespace, ask: Callable[[CurveKeys | None], Coroutine[Any, Any, T]]
) -> T:
    """One question to hmmd, with the keys the environment names; _Refused if it fails."""
    curve = _curve(args)
    try:
        return asyncio.run(ask(curve))
    except AgentError as exc:
        raise _Refused(_unreachable(args, curve, exc)) from exc


def _status(args: argparse.Namespace) -> int:
    """``hmmctl status``: the daemon's figures, one per line."""
    from hmmirror.client.session import status

    stats = _ask_hmmd(args, lambda curve: status(args.endpoint, args.timeout, curve))
    width = max(len(k) for k in stats)
    for key, value in stats.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _top_until_interrupted(args: argparse.Namespace) -> int:
    """``hmmctl top``, which Ctrl-C ends normally."""
    try:
        return asyncio.run(_top(args))
    except KeyboardInterrupt:
        return 0


def _keys(args: argparse.Namespace) -> int:
    """``hmmctl keys generate DIR NAME``."""
    from hmmirror.client.curve import generate

    try:
        public, secret = generate(args.directory, args.name, force=args.force)
    except ValueError as exc:  # a NAME that is not a plain file name
        return _fail(f"keys generate: {exc}", EXIT_USAGE)
    except OSError as exc:  # the keys exist already, or the directory cannot be written
        return _fail(f"keys generate: {exc}")
    print(f"public {public}\nsecret {secret}")
    return 0


def _version() -> str:
    """What ``hmmctl --version`` prints."""
    return version_line("hmmctl", version("hmmirror-tools"))


def _print_version(args: argparse.Namespace) -> int:
    """``hmmctl version``."""
    print(_version())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hmmctl`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    command = COMMANDS.get(args.command)
    if command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return command(args)
    except _Refused as exc:
        return _fail(str(exc), exc.code)


def _check(args: argparse.Namespace) -> int:
    """``hmmctl check``."""
    from hmmirror.tools.check.report import main as check_main
    from hmmirror.tools.check.runner import Options
    from hmmirror.tools.check.scenarios import SCENARIOS

    if args.scenario == "list":
        for name, scenario in SCENARIOS.items():
            print(f"{name:<13} {scenario.help}")
        return EXIT_OK
    if args.scenario not in SCENARIOS:
        return _fail(f"check: no scenario {args.scenario!r}; try --scenario list", EXIT_USAGE)
    needed = SCENARIOS[args.scenario].min_agents
    if args.agents < needed:
        return _fail(f"check: --agents must be at least {needed} here", EXIT_USAGE)
    missing = _missing_daemon("check")
    if missing is not None:
        return missing
    opts = Options(
        seed=args.seed, duration=args.duration, ops=args.ops, agents=args.agents,
        scenario=args.scenario, ack_deadline=args.ack_deadline, keep=args.keep,
    )  # fmt: skip
    return check_main(opts, sys.stdout, progress=not args.quiet)


def _table(heads: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns aligned under their heads."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(heads)]  # fmt: skip
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


_WATCHED = {0: "proc", 1: "proc+uffd", 2: "proc+uffd+strict"}
_WRITES = {0: "-", 1: "watch", 2: "strict", 3: "strict"}


def _inventory(args: argparse.Namespace) -> int:
    """``hmmctl mms`` and ``hmmctl mirrors``."""
    from hmmirror.client.session import inventory

    mms, mirrors = _ask_hmmd(args, lambda curve: inventory(args.endpoint, args.timeout, curve))
    if args.command == "mms":
        print(_table(
            ("PID", "START", "SEQ", "ACTIVE", "MIRRORS", "WATCHED BY"),
            [(m["pid"], m["start_time"], m["seq"], m["active"], m["mirrors"],
              _WATCHED.get(m["uffd"], "?")) for m in mms],
        ))  # fmt: skip
    else:
        print(_table(
            ("MIRROR", "AGENT", "SESSION", "PID", "RANGE", "PAGES HELD", "ACCESS", "WRITES"),
            [(m["mirror"], m["agent"], m["session"], m["pid"],
              f"{int(m['lo']):#x}-{int(m['hi']):#x}", m["held_pages"],
              "rw" if int(m["access"]) & 2 else "r", _WRITES.get(int(m["flags"]), "?"))
             for m in mirrors],
        ))  # fmt: skip
    return 0


def _rate(prev: dict[str, int | float | str], now: dict[str, int | float | str], *keys: str) -> str:
    """Per-second rate of the summed counters ``keys`` between two status readings."""
    dt = float(now["uptime_s"]) - float(prev["uptime_s"])
    delta = sum(float(now.get(k, 0)) - float(prev.get(k, 0)) for k in keys)
    return f"{delta / dt:.0f}" if dt > 0 else "-"


async def _top(args: argparse.Namespace) -> int:
    """``hmmctl top``: one line per interval, with rates from successive status figures."""
    from hmmirror.client.session import status

    curve = _curve(args)
    heads = ("TIME", "SESS", "MMS", "MIRRORS", "INVAL/S", "FAULT/S", "DMA/S", "ACK P50 US",
             "ACK P99 US", "EVICT", "STALE")  # fmt: skip
    print("  ".join(heads), flush=True)
    prev: dict[str, int | float | str] | None = None
    shown = 0
    while args.count == 0 or shown < args.count:
        try:
            now = await status(args.endpoint, args.timeout, curve)
        except AgentError as exc:
            return _fail(_unreachable(args, curve, exc))
        if prev is not None:
            line = (
                time.strftime("%H:%M:%S"), now["sessions"], now["mms"], now["mirrors"],
                _rate(prev, now, "invalidations"), _rate(prev, now, "faults"),
                _rate(prev, now, "dma_reads", "dma_writes"),
                now["ack_p50_us"], now["ack_p99_us"], now["evictions"], now["stale"],
            )  # fmt: skip
            print("  ".join(str(c) for c in line), flush=True)
            shown += 1
        prev = now
        await asyncio.sleep(args.interval)
    return 0


def _stat_mr(args: argparse.Namespace) -> int:
    """``hmmctl stat mr``: one line per MR granted to us, as ``rdma stat mr`` prints them."""
    from hmmirror.client.mlx5.peer import RdmaPeer

    curve = None
    if args.agent_key or args.client_key:
        if not (args.agent_key and args.client_key):
            return _fail("stat mr needs both --agent-key and --client-key", EXIT_USAGE)
        try:
            curve = CurveKeys.load(args.agent_key, args.client_key)
        except (OSError, ValueError) as exc:
            return _fail(f"stat mr: cannot load the CURVE keys: {exc}", EXIT_USAGE)

    async def fetch() -> tuple[str, list[dict[str, int]]]:
        """Ask the agent for its MR table."""
        async with RdmaPeer.connect(args.agent, timeout=args.timeout, curve=curve) as peer:
            return await peer.stat_mr()

    try:
        device, rows = asyncio.run(fetch())
    except AgentError as exc:
        return _fail(str(exc))
    if args.json:
        out = []
        for row in rows:
            entry: dict[str, object] = {"ifname": device, "mrn": row["mrn"]}
            if args.details:
                entry.update(rkey=row["rkey"], pid=row["pid"], addr=row["addr"])
                entry.update(length=row["length"])
            entry.update((name, row[name]) for name in MR_COUNTERS)
            out.append(entry)
        print(json.dumps(out))
        return 0
    for row in rows:
        fields = [f"dev {device}", f"mrn {row['mrn']}"]
        if args.details:
            where = "all" if row["length"] == 0 else f"{row['addr']:#x} length {row['length']}"
            fields += [f"rkey {row['rkey']:#x}", f"pid {row['pid']}", f"addr {where}"]
        fields += [f"{name} {row[name]}" for name in MR_COUNTERS]
        print(" ".join(fields))
    return 0


#: The subcommands, by name; none given prints the help (exit 2).
COMMANDS: dict[str | None, Callable[[argparse.Namespace], int]] = {
    "status": _status,
    "mms": _inventory,
    "mirrors": _inventory,
    "top": _top_until_interrupted,
    "keys": _keys,
    "stat": _stat_mr,
    "demo": _demo,
    "check": _check,
    "version": _print_version,
}


if __name__ == "__main__":
    sys.exit(main())
