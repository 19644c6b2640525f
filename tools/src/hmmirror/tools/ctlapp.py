"""The ``hmmctl`` command line: inspect a running hmmd or hm-agent, make keys, run the demo
or the coherence checker (``hmmctl check``), print shell completion.

The parser is ``ctlparse``; the commands live in ``ctlinspect`` (status, mms, mirrors,
top), ``ctlstat`` (stat mr, keys) and ``ctlrun`` (demo, check, version, completion).
Global options (``--endpoint``, ``--timeout``, ``--server-key``, ``--client-key``,
``-j/--json``, ``-d/--details``) go before or after the command.

Exit codes: 0 success, 1 failure (daemon or agent unreachable, violations
found, keys that exist already, the daemon's distribution missing for ``demo``
and ``check``), 2 usage error (a malformed endpoint, duration or count, an
unusable key file), 141 when what read stdout went away (``| head``), as SIGPIPE
ends a program. Every error is one line on stderr, ``hmmctl: ...``.
``HMMIRROR_ENDPOINT`` sets the default hmmd endpoint, ``HMMIRROR_AGENT`` the
default hm-agent endpoint, ``HMMIRROR_SERVER_KEY`` and ``HMMIRROR_CLIENT_KEY`` the
defaults of ``--server-key`` and ``--client-key`` (the CURVE certificates for a
``tcp://`` hmmd), ``HMMIRROR_AGENT_KEY`` that of ``stat mr --agent-key``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence

from hmmirror.tools import ctlinspect, ctlrun, ctlstat, ctltrace
from hmmirror.tools.ctlinspect import Refused, fail
from hmmirror.tools.ctlparse import MANY_HMMDS
from hmmirror.tools.ctlparse import build as _parser
from hmmirror.transport.settings import EXIT_USAGE

__all__ = ["COMMANDS", "_parser", "main"]

#: The commands that read hmmd and take one endpoint only (``MANY_HMMDS`` take several).
ONE_HMMD = ("top", "trace")
#: The subcommands, by name; none given prints the help (exit 2).
COMMANDS: dict[str | None, Callable[[argparse.Namespace], int]] = {
    "status": ctlinspect.status,
    "mms": ctlinspect.inventory,
    "mirrors": ctlinspect.inventory,
    "top": ctlinspect.top_until_interrupted,
    "trace": ctltrace.trace,
    "keys": ctlstat.keys,
    "stat": ctlstat.stat_mr,
    "demo": ctlrun.demo,
    "check": ctlrun.check,
    "version": ctlrun.show_version,
    "completion": ctlrun.completion,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hmmctl`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    command = COMMANDS.get(args.command)
    if command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    endpoints = args.endpoint if isinstance(args.endpoint, tuple) else (args.endpoint,)
    args.endpoint, args.endpoints = endpoints[0], endpoints
    if len(endpoints) > 1 and args.command in ONE_HMMD:
        return fail(
            f"{args.command} reads one hmmd, and --endpoint names {len(endpoints)}: give one "
            f"({', '.join(MANY_HMMDS)} read several)",
            EXIT_USAGE,
        )
    try:
        code = command(args)
        sys.stdout.flush()  # a block-buffered stdout's reader gone shows here, not at exit
        return code
    except Refused as exc:
        return fail(str(exc), exc.code)
    except BrokenPipeError:
        # What reads stdout went away (``hmmctl mirrors | head``): stop quietly with the
        # status of a program that SIGPIPE ended, and point stdout at /dev/null so that the
        # interpreter's last flush does not fail again (Python's "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
