"""The ``hmmctl`` command line: inspect a running hmmd, or run the demo.

Exit codes: 0 success, 1 failure (daemon unreachable, violations found),
2 usage error. ``HMMIRROR_ENDPOINT`` sets the default endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from hmmirror.client.errors import AgentError

DEFAULT_ENDPOINT = "ipc:///run/hmmirror/hmmd.sock"


def _parser() -> argparse.ArgumentParser:
    """Build the ``hmmctl`` argument parser and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="hmmctl",
        description="Inspect hmmirror's daemon, or run the self-contained demo.",
    )
    parser.add_argument(
        "--endpoint",
        default=os.environ.get("HMMIRROR_ENDPOINT", DEFAULT_ENDPOINT),
        help="hmmd endpoint (default $HMMIRROR_ENDPOINT or %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=2.0, help="seconds to wait for hmmd (default 2)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("status", help="show the daemon's state and figures")
    demo = sub.add_parser(
        "demo",
        help="start hmmd, a churning target and two agents; show live counters and a report",
    )
    demo.add_argument("--duration", type=float, default=20.0, help="seconds of churn (default 20)")
    demo.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hmmctl`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from hmmirror.client.demo import main as demo_main

        return demo_main(args.duration, args.seed)
    if args.command == "status":
        from hmmirror.client.session import status

        try:
            stats = asyncio.run(status(args.endpoint, args.timeout))
        except AgentError as exc:
            print(f"hmmctl: {exc}", file=sys.stderr)
            return 1
        width = max(len(k) for k in stats)
        for key, value in stats.items():
            print(f"{key:<{width}}  {value}")
        return 0
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
