"""``hmmctl``'s argument parser: its subcommands, and the global options every one accepts.

The global options (``--endpoint``, ``--timeout``, ``--server-key``, ``--client-key``,
``-j/--json``, ``-d/--details``) may come before the command or after it, as in
``rdma -j stat mr`` and ``rdma stat mr -j``: the top parser holds their defaults, and
each subcommand's parser takes them again with ``SUPPRESS`` as default, so that one
given after the command overrides the top's value and one left out leaves it alone.
``-j`` says, under each command that has it, the keys of that command's JSON.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from hmmirror.client.curve import CLIENT_KEY_ENV, SERVER_KEY_ENV
from hmmirror.tools import DISTRIBUTION
from hmmirror.transport.settings import (
    ConfigError,
    Parser,
    VersionAction,
    distribution_version,
    flag,
    parse_duration,
    parse_endpoint,
    version_line,
    whole_number,
)

DEFAULT_ENDPOINT = "ipc:///run/hmmirror/hmmd.sock"
DEFAULT_AGENT = "tcp://127.0.0.1:18515"
#: Said under each subcommand: where its global options may go.
GLOBALS_AFTER = (
    "Global options (--endpoint, --timeout, --server-key, --client-key, -j, -d) may also "
    "follow the command; see hmmctl --help."
)
#: What ``-j`` prints, by command (the keys are stable; new ones may be added).
JSON_HELP = {
    "status": "one JSON object (one line per hmmd, given several): hmmd's figures by the "
    "names the text shows (epoch, "
    "endpoint, pid, uptime_s, sessions, mms, mirrors, invalidations, stale, ack_p50_us, "
    "ack_p99_us, evictions, ...; ack_histogram parsed: [{le_s, count}], le_s null for the "
    "bucket above 10 s); a caller who is not root gets the counters only",
    "mms": "one JSON object per line: pid, start_time, seq, active, mirrors, watched "
    "(proc, proc+uffd or proc+uffd+strict); given several hmmds, also endpoint",
    "mirrors": "one JSON object per line: mirror, agent, session, pid, lo, hi (the range, "
    "bytes), held_pages, access (r or rw), writes (-, watch or strict); given several "
    "hmmds, also endpoint",
    "top": "one JSON object per line and interval: ts (Unix seconds), sessions, mms, "
    "mirrors, invalidations_per_s, faults_per_s, dma_per_s, "
    "ack_p50_us, ack_p99_us, evictions, stale",
    "stat": "a JSON array, as rdma -j stat mr: ifindex, ifname, mrn, page_faults, "
    "page_faults_handled, page_invalidations, page_invalidations_handled, page_prefetch; "
    "with -d also rkey, lkey, iova (hex strings, as rdma writes them), mrlen, pid, comm",
    "keys": "one JSON object: public, secret (the two files' paths)",
    "check": "the final report as one JSON object (progress goes to stderr): scenario, "
    "seed, elapsed_s, rounds, target_ops (by kind), agents, reads, quick_reads, writes, "
    "atomics, "
    "page_fault_calls, page_faults, prefetch_calls, page_prefetch, invalidations, "
    "pages_invalidated, stale, evictions, refused, busy, slowest_op_s, "
    "translations_checked, reads_judged, atomics_judged, judged, checker_cpu_s, "
    "violations ([{kind, detail}]), violations_by_kind, notes, logs, replay",
    "demo": "the final report as one JSON object (the live figures go to stderr): seed, "
    "elapsed_s, rounds, rounds_skipped, invalidations, ack_p50_us, ack_p99_us, faults, "
    "pages_zapped, reads, writes, refused, stale, evictions, violations ([{mirror, addr, "
    "kind, entry, live}]), check (the checker's report, as check -j, or null)",
    "version": "one JSON object: program, version, protocol",
    "trace": "one JSON object: output, seconds, events, dropped, faults, invalidations, "
    "acks, stale, evictions (the trace itself goes to --output)",
}


#: The commands that read several hmmds (``--endpoint A,B``); the others read one.
MANY_HMMDS = ("status", "mms", "mirrors")
#: The most hmmds one command reads (as hm-agent's ``daemon``).
MAX_HMMDS = 16


def parse_endpoints(value: str, label: str) -> tuple[str, ...]:
    """One hmmd endpoint, or several, comma-separated and different (at most MAX_HMMDS)."""
    endpoints = tuple(parse_endpoint(part.strip(), label) for part in str(value).split(","))
    if len(set(endpoints)) != len(endpoints) or len(endpoints) > MAX_HMMDS:
        raise ConfigError(f"{label}: at most {MAX_HMMDS} different hmmd endpoints, got {value!r}")
    return endpoints


def duration(name: str, minimum: float = 0.001) -> Callable[[str], float]:
    """A flag's duration in seconds (``2``, ``2s``, ``250ms``), at least ``minimum``."""
    return flag(lambda text, label: parse_duration(text, label, minimum), name)


def _global_options() -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """The global options, with their top-level defaults (read from the environment now)."""
    return [
        (("--endpoint",), dict(
            type=flag(parse_endpoints, "--endpoint"), metavar="ENDPOINT",
            default=os.environ.get("HMMIRROR_ENDPOINT", DEFAULT_ENDPOINT),
            help="hmmd endpoint, ipc://PATH or tcp://HOST:PORT (default $HMMIRROR_ENDPOINT "
            "or %(default)s); status, mms and mirrors take the several hmmds of a host, "
            "comma-separated, as hm-agent does",
        )),
        (("--timeout",), dict(
            type=duration("--timeout"), default=2.0, metavar="DURATION",
            help="how long to wait for hmmd or hm-agent: seconds, or 500ms, 2s (default 2)",
        )),
        (("--server-key",), dict(
            metavar="FILE", default=os.environ.get(SERVER_KEY_ENV, ""),
            help=f"hmmd's public CURVE certificate, for a tcp:// hmmd (default ${SERVER_KEY_ENV})",
        )),
        (("--client-key",), dict(
            metavar="FILE", default=os.environ.get(CLIENT_KEY_ENV, ""),
            help="our secret CURVE certificate (.key_secret), towards a tcp:// hmmd and for "
            f"stat mr (default ${CLIENT_KEY_ENV})",
        )),
        (("-j", "--json"), dict(
            action="store_true", default=False,
            help="JSON output (status, mms, mirrors, top, trace, stat mr, check, demo, keys, "
            "version); each command's --help names its keys",
        )),
        (("-d", "--details"), dict(
            action="store_true", default=False,
            help="more detail (stat mr: rdma's rkey, lkey, iova, mrlen, pid, comm)",
        )),
    ]  # fmt: skip


def _take_globals(parser: argparse.ArgumentParser, output: str | None) -> None:
    """Give a subcommand's ``parser`` the global options, defaulting to the top's values.

    They stay out of its help, but for ``-j`` where the command has JSON output (its help
    then names the keys of ``JSON_HELP[output]``) and ``-d`` under ``stat mr``.
    """
    for flags, options in _global_options():
        options = {**options, "default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
        if flags[0] == "-j" and output is not None:
            options["help"] = JSON_HELP[output]
        if flags[0] == "-d" and output == "stat":
            options["help"] = "also each MR's rkey, lkey, iova, mrlen, pid and comm (rdma's names)"
        parser.add_argument(*flags, **options)


def _command(
    sub: argparse._SubParsersAction[Any],
    name: str,
    help: str,
    output: str | None = "",
    **kw: Any,
) -> argparse.ArgumentParser:
    """A subcommand that takes the global options too; ``output`` is its ``JSON_HELP`` key
    ("": the command's name; None: no JSON output of its own)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, epilog=kw.pop("epilog", GLOBALS_AFTER), **kw
    )
    _take_globals(parser, name if output == "" else output)
    return parser


def build() -> argparse.ArgumentParser:
    """Build the ``hmmctl`` argument parser and its subcommands."""
    parser = Parser(
        prog="hmmctl",
        description="Inspect hmmirror's daemon and agents, or run the self-contained demo "
        "and the coherence checker. Global options may come before or after COMMAND.",
        epilog=f"Environment: HMMIRROR_ENDPOINT (--endpoint), {SERVER_KEY_ENV} "
        f"(--server-key), {CLIENT_KEY_ENV} (--client-key), HMMIRROR_AGENT (stat mr --agent), "
        "HMMIRROR_AGENT_KEY (stat mr --agent-key). Bash completion: "
        "hmmctl completion bash > /etc/bash_completion.d/hmmirror",
    )
    for flags, options in _global_options():
        parser.add_argument(*flags, **options)
    parser.add_argument("--version", action=VersionAction, line=program_version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _command(sub, "status", "show the daemon's state and figures")
    _command(sub, "mms", "list the processes hmmd watches, and how")
    _command(sub, "mirrors", "list every mirror: agent, process, range, pages held")
    top = _command(
        sub, "top", "live figures: a full-screen table on a terminal (q quits), else a line "
        "per interval: sessions, mirrors, in-flight invalidations, rates, ack latency and "
        "its histogram, evictions",
    )  # fmt: skip
    top.add_argument(
        "--interval", type=duration("--interval"), default=1.0,
        help="seconds between readings (1)",
    )  # fmt: skip
    top.add_argument(
        "--count", type=flag(whole_number(0), "--count"), default=0,
        help="lines to print, one per interval, even on a terminal (0: until q or Ctrl-C)",
    )  # fmt: skip
    _trace_parser(sub)
    keys = _command(sub, "keys", "CURVE keys for TCP connections to hmmd", output=None)
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    gen = _command(
        keys_sub, "generate", "write NAME.key (public) and NAME.key_secret (mode 0600) into DIR",
        output="keys",
    )  # fmt: skip
    gen.add_argument("directory", metavar="DIR")
    gen.add_argument("name", metavar="NAME", help="a file name: letters, digits, _ . -")
    gen.add_argument(
        "--force", action="store_true", help="replace NAME's keys if they exist (default: refuse)"
    )
    _stat_parser(sub)
    _demo_parser(sub)
    _check_parser(sub)
    _command(sub, "version", "print versions and exit")
    completion = _command(
        sub, "completion", "print a shell completion script for hmmd, hm-agent and hmmctl",
        output=None,
    )  # fmt: skip
    completion.add_argument("shell", choices=["bash"], help="the shell (bash)")
    return parser


def _trace_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """``hmmctl trace``: hmmd's timeline as a Chrome trace event file (``ctltrace``)."""
    trace = _command(
        sub, "trace", "record faults, invalidations, acks, STALE and evictions per mirror "
        "into a trace Perfetto opens (root or an inspect grant)",
    )  # fmt: skip
    trace.add_argument(
        "--seconds", type=duration("--seconds"), default=5.0, metavar="DURATION",
        help="how long hmmd records (default 5; at most 600)",
    )  # fmt: skip
    trace.add_argument(
        "-o", "--output", default="hmmirror-trace.json", metavar="FILE",
        help="the Chrome trace event JSON to write (default %(default)s); open it in "
        "https://ui.perfetto.dev or chrome://tracing",
    )  # fmt: skip
    trace.add_argument(
        "--max-events", type=flag(whole_number(1), "--max-events"), default=32768,
        metavar="N", help="keep at most the newest N events (default and most 32768)",
    )  # fmt: skip


def _stat_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """``hmmctl stat mr [show]``, in the shape of iproute2's ``rdma stat mr``."""
    stat = _command(
        sub, "stat", "device statistics of an hm-agent, as `rdma stat` shows", output=None
    )
    stat_sub = stat.add_subparsers(dest="object", metavar="OBJECT", required=True)
    stat_mr = _command(
        stat_sub, "mr", "per-MR ODP counters, in the shape of `rdma stat mr [show]`",
        output="stat",
    )  # fmt: skip
    stat_mr.add_argument(
        "action", nargs="?", choices=["show"], default="show", metavar="show",
        help="show the counters (the default, as for rdma)",
    )  # fmt: skip
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
        help="the agent's public CURVE certificate (a tcp:// agent; default $HMMIRROR_AGENT_KEY); "
        "--client-key is then ours, allowed and granted by the agent",
    )


def _demo_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """``hmmctl demo``."""
    demo = _command(
        sub, "demo", "start hmmd, a churning target and two agents; show the live view (full "
        "screen on a terminal, as top), a progress bar (on a terminal's stderr, not with -j) "
        "and a report",
    )  # fmt: skip
    demo.add_argument(
        "--duration", type=duration("--duration"), default=20.0,
        help="seconds of churn (default 20)",
    )  # fmt: skip
    demo.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    demo.add_argument(
        "--check-duration",
        type=duration("--check-duration", minimum=0),
        default=8.0,
        help="seconds of the coherence checker's rounds after the demo (default 8; 0 skips it)",
    )


def _check_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """``hmmctl check``: the coherence checker (see ``hmmirror.tools.check``)."""
    from hmmirror.tools.check.scenarios import SCENARIOS

    names = "\n".join(f"  {name:<13} {s.help}" for name, s in SCENARIOS.items())
    check = _command(
        sub,
        "check",
        "run a seeded random workload under hmmd and judge it with two oracles",
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
        epilog=GLOBALS_AFTER,
    )
    check.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    check.add_argument(
        "--duration", type=duration("--duration"), default=None,
        help="seconds of rounds, after start-up (20; 3600 with --until-judged)",
    )  # fmt: skip
    check.add_argument(
        "--ops", type=flag(whole_number(1), "--ops"), default=None,
        help="most target operations (5000; no limit with --until-judged)",
    )  # fmt: skip
    check.add_argument(
        "--until-judged", type=flag(whole_number(1), "--until-judged"), default=0, metavar="N",
        help="stop the rounds once N operations are judged or sure to be: translations "
        "checked plus the READs the data oracle judges at the end (atomics judged come on top)",
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
        "--ack-deadline", type=duration("--ack-deadline"), default=1.0,
        help="hmmd's ack deadline, seconds (1)",
    )  # fmt: skip
    check.add_argument("--keep", action="store_true", help="keep the run's logs and say where")
    check.add_argument(
        "-q", "--quiet", action="store_true",
        help="only the report (no progress lines, no progress bar)",
    )  # fmt: skip


def program_version() -> str:
    """What ``hmmctl --version`` prints."""
    return version_line("hmmctl", distribution_version(DISTRIBUTION))
