"""``hmmctl demo``, ``check``, ``version`` and ``completion``: the commands that start an
hmmd of their own, or need none.

With ``-j`` the demo and the checker print their final report as one JSON object on
stdout, and their progress (the live table, the checker's phases) on stderr, so that
``hmmctl check -j | jq .violations`` reads the verdict alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from hmmirror.proto.version import PROTOCOL_VERSION
from hmmirror.tools import DISTRIBUTION
from hmmirror.tools.ctlinspect import emit, fail
from hmmirror.tools.ctlparse import program_version
from hmmirror.transport.settings import EXIT_OK, EXIT_USAGE, distribution_version


def _missing_daemon(command: str) -> int | None:
    """EXIT_FAILURE, said, when ``command`` cannot run for want of hmmd here; else None.

    The demo and the checker start an hmmd of their own (``python -m hmmirror.daemon``),
    and the completion script covers hmmd's parser; an install of the tools beside the
    client only has no hmmd.
    """
    if importlib.util.find_spec("hmmirror.daemon") is not None:
        return None
    return fail(
        f"{command} starts an hmmd of its own, and hmmd (the hmmirror-daemon distribution) "
        f"is not installed for {sys.executable}; install it, or run {command} where it is"
        if command != "completion"
        else f"completion covers hmmd too, and hmmd (the hmmirror-daemon distribution) is "
        f"not installed for {sys.executable}; install it, or run completion where it is"
    )


def demo(args: argparse.Namespace) -> int:
    """``hmmctl demo``."""
    missing = _missing_daemon("demo")
    if missing is not None:
        return missing
    from hmmirror.testing.hmmd import HmmdStartError
    from hmmirror.tools.demo import main as demo_main

    try:
        return demo_main(args.duration, args.seed, args.check_duration, as_json=args.json)
    except HmmdStartError as exc:  # its log's last line says why
        last = (str(exc).strip().splitlines() or ["?"])[-1]
        return fail(f"demo: cannot start hmmd: {last}")


def check(args: argparse.Namespace) -> int:
    """``hmmctl check``."""
    from hmmirror.tools.check.report import main as check_main
    from hmmirror.tools.check.runner import Options
    from hmmirror.tools.check.scenarios import SCENARIOS

    if args.scenario == "list":
        for name, scenario in SCENARIOS.items():
            if args.json:
                emit({"name": name, "help": scenario.help, "min_agents": scenario.min_agents})
            else:
                print(f"{name:<13} {scenario.help}")
        return EXIT_OK
    if args.scenario not in SCENARIOS:
        return fail(f"check: no scenario {args.scenario!r}; try --scenario list", EXIT_USAGE)
    needed = SCENARIOS[args.scenario].min_agents
    if args.agents < needed:
        return fail(f"check: --agents must be at least {needed} here", EXIT_USAGE)
    missing = _missing_daemon("check")
    if missing is not None:
        return missing
    until = args.until_judged
    default_duration, default_ops = (3600.0, 10**12) if until else (20.0, 5000)
    opts = Options(
        seed=args.seed, scenario=args.scenario, agents=args.agents,
        duration=default_duration if args.duration is None else args.duration,
        ops=default_ops if args.ops is None else args.ops,
        ack_deadline=args.ack_deadline, keep=args.keep, until_judged=until,
    )  # fmt: skip
    return check_main(opts, sys.stdout, progress=not args.quiet, as_json=args.json)


def show_version(args: argparse.Namespace) -> int:
    """``hmmctl version``."""
    if args.json:
        emit({
            "program": "hmmctl", "version": distribution_version(DISTRIBUTION),
            "protocol": f"{PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}",
        })  # fmt: skip
    else:
        print(program_version())
    return 0


def completion(args: argparse.Namespace) -> int:
    """``hmmctl completion bash``: the script ``python -m hmmirror.tools.docgen completion
    bash`` prints, for hmmd, hm-agent and hmmctl."""
    if args.json:
        return fail("completion: there is no JSON output of a completion script", EXIT_USAGE)
    missing = _missing_daemon("completion")
    if missing is not None:
        return missing
    from hmmirror.tools.docgen import bash_completion

    sys.stdout.write(bash_completion())
    return 0
