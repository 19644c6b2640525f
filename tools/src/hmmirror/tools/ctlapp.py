"""The ``hmmctl`` command line: inspect a running hmmd or hm-agent, make keys, run the demo
or the coherence checker (``hmmctl check``), print shell completion.

The parser is ``ctlparse``; the commands live in ``ctlinspect`` (status, mms, mirrors,
top), ``ctlstat`` (stat mr, keys) and ``ctlrun`` (demo, check, version, completion).
Global options (``--endpoint``, ``--timeout``, ``--server-key``, ``--client-key``,
``-j/--json``, ``-d/--details``) go before or after the command.

Exit codes: 0 success, 1 failure (daemon or agent unreachable, violations
found, keys that exist already, the daemon's distribution missing for ``demo``
and ``check``), 2 usage error (a malformed endpoint, duration or count, an
unusable key file). Every error is one line on stderr, ``hmmctl: ...``.
``HMMIRROR_ENDPOINT`` sets the default hmmd endpoint, ``HMMIRROR_AGENT`` the
default hm-agent endpoint, ``HMMIRROR_SERVER_KEY`` and ``HMMIRROR_CLIENT_KEY`` the
defaults of ``--server-key`` and ``--client-key`` (the CURVE certificates for a
``tcp://`` hmmd), ``HMMIRROR_AGENT_KEY`` that of ``stat mr --agent-key``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from hmmirror.tools import ctlinspect, ctlrun, ctlstat, ctltrace
from hmmirror.tools.ctlinspect import Refused, fail
from hmmirror.tools.ctlparse import build as _parser
from hmmirror.transport.settings import EXIT_USAGE

__all__ = ["COMMANDS", "_parser", "main"]

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
    try:
        return command(args)
    except Refused as exc:
        return fail(str(exc), exc.code)


if __name__ == "__main__":
    sys.exit(main())
