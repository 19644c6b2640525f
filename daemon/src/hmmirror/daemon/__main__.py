"""The ``hmmd`` command line: run the daemon, check or print its configuration.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
Logs go to stderr (journald picks them up); ``run`` prints exactly one line to
stdout, ``hmmd ready <endpoint>``, once the socket is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from hmmirror.daemon import logfmt, sdnotify, version
from hmmirror.daemon.config import DEFAULT_CONFIG_FILE, Config, ConfigError, load
from hmmirror.daemon.policy import Policy, PolicyError
from hmmirror.transport.settings import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    VersionAction,
    refuse,
    version_line,
)

#: The settings the ``run`` flags may set (a flag not given is None: the layer below decides).
_FLAGS = (
    "endpoint",
    "heartbeat",
    "ack_deadline",
    "copy_deadline",
    "poll_min",
    "poll_max",
    "uffd",
    "uffd_fork",
    "insecure",
    "metrics",
    "policy",
    "socket_group",
    "log_format",
    "expose_socket",
    "owners_dir",
    "curve_key",
    "curve_allow",
    "reply_cap",
    "max_connections",
    "max_connections_per_peer",
    "max_mirrors",
    "max_mirrors_per_peer",
    "max_mirror_pages_per_peer",
    "nice",
    "log_level",
)


def _parser() -> argparse.ArgumentParser:
    """Build the ``hmmd`` argument parser and its subcommands."""
    parser = Parser(
        prog="hmmd",
        description="hmmirror host daemon: watches live processes' memory and sends synchronous, "
        "sequence-numbered invalidations to mirroring agents over ZeroMQ.",
        epilog="Settings come from defaults < the config file < HMMIRROR_* environment variables "
        "(e.g. HMMIRROR_ACK_DEADLINE=2s) < flags. Durations look like 2s, 250ms, 1m; sizes like "
        "32MiB.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML config file (default {DEFAULT_CONFIG_FILE} if present)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective configuration and exit"
    )
    parser.add_argument("--version", action=VersionAction, line=_version_line)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--endpoint", help="ipc://PATH (default) or tcp://HOST:PORT to bind")
    run.add_argument(
        "--heartbeat", metavar="DURATION", help="agent heartbeat interval (default 1s)"
    )
    run.add_argument(
        "--ack-deadline", metavar="DURATION", help="evict a mirror whose ACK is later (default 2s)"
    )
    run.add_argument(
        "--copy-deadline",
        metavar="DURATION",
        help="answer EBUSY to a copy a target blocks for longer (default 1s)",
    )
    run.add_argument(
        "--poll-interval",
        metavar="DURATION",
        dest="poll_min",
        help="fastest proc watcher poll (default 2ms)",
    )
    run.add_argument(
        "--poll-max",
        metavar="DURATION",
        dest="poll_max",
        help="slowest proc watcher poll, while nothing changes (default 50ms)",
    )
    run.add_argument(
        "--uffd",
        choices=["off", "cooperate", "inject"],
        help="how to get a target's userfaultfd for synchronous events (default cooperate)",
    )
    run.add_argument(
        "--uffd-fork",
        choices=["close", "adopt"],
        help="a watched target's child's userfaultfd: close it, or adopt it (default close)",
    )
    run.add_argument(
        "--reply-cap",
        metavar="SIZE",
        help="reply bytes queued for one connection before its requests get EBUSY (32MiB)",
    )
    run.add_argument("--policy", metavar="FILE", help="grants of agents to targets (TOML)")
    run.add_argument("--expose-socket", metavar="PATH", help="where targets send their userfaultfd")
    run.add_argument(
        "--owners-dir",
        metavar="DIR",
        help="shared by the hmmds of one host, so that each process has one (default: "
        "hmmd-owners beside the intake socket; off: claim nothing)",
    )
    run.add_argument(
        "--socket-group", metavar="GROUP", help="group of the 0660 sockets (default hmmirror)"
    )
    run.add_argument(
        "--metrics", metavar="HOST:PORT", help="serve Prometheus /metrics there (default: off)"
    )
    run.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        help="allow a tcp:// endpoint without CURVE (logged as a warning)",
    )
    run.add_argument(
        "--max-connections",
        metavar="N",
        help="connections kept at most (default 0: a quarter of the descriptor limit allows)",
    )
    run.add_argument(
        "--max-connections-per-peer",
        metavar="N",
        help="connections one local uid or remote address may hold (default 32; root: any)",
    )
    run.add_argument(
        "--max-mirrors",
        metavar="N",
        help="mirrors kept at most, of all agents (default 0: a quarter of vm.max_map_count)",
    )
    run.add_argument(
        "--max-mirrors-per-peer",
        metavar="N",
        help="mirrors one local uid or remote peer may hold (default 4096; root: any)",
    )
    run.add_argument(
        "--max-mirror-pages-per-peer",
        metavar="N",
        help="pages one local uid or remote peer may mirror (default 2^28: 1 TiB; root: any)",
    )
    run.add_argument(
        "--nice",
        metavar="N",
        help="nice value of hmmd's threads, -20..19 (default -10: ahead of the targets it serves)",
    )
    run.add_argument("--curve-key", metavar="FILE", help="the daemon's secret CURVE certificate")
    run.add_argument(
        "--curve-allow", metavar="DIR", help="directory of allowed agents' public certificates"
    )
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--log-format", choices=["text", "json"], help="stderr lines: text or JSON (text)"
    )
    run.add_argument(
        "--print-config", action="store_true", help="print the effective configuration and exit"
    )
    sub.add_parser("check-config", help="validate the configuration and exit 0 if it is good")
    sub.add_parser("version", help="print versions and exit")
    return parser


async def _run(config: Config) -> int:
    """Serve until SIGTERM or SIGINT, announcing readiness on stdout; return the exit code."""
    from hmmirror.daemon.app import Daemon

    daemon = Daemon(config)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        """SIGTERM/SIGINT: tell systemd we are stopping, then stop."""
        sdnotify.notify("STOPPING=1")
        daemon.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)

    watchdog: asyncio.Task[None] | None = None

    def ready(endpoint: str) -> None:
        """Announce readiness: the ``hmmd ready`` line, systemd's READY=1, the log."""
        nonlocal watchdog
        print(f"hmmd ready {endpoint}", flush=True)
        sdnotify.notify(f"READY=1\nSTATUS=serving on {endpoint}, epoch {daemon.epoch}")
        interval = sdnotify.watchdog_interval()
        if interval is not None:
            watchdog = asyncio.ensure_future(sdnotify.keep_watchdog_fed(interval))
        logging.getLogger("hmmirror.daemon").info(
            "hmmd ready on %s (epoch %s)", endpoint, daemon.epoch
        )

    try:
        await daemon.serve(ready)
    finally:
        if watchdog is not None:
            watchdog.cancel()
    return EXIT_OK


def _serve(config: Config, args: argparse.Namespace) -> int:
    """``hmmd run``: serve until SIGTERM or SIGINT; return the exit code."""
    from hmmirror.daemon.linux.priority import apply_nice
    from hmmirror.daemon.owners import OwnersError
    from hmmirror.transport import AddressInUse

    apply_nice(config.nice)  # before the loop and libzmq make threads, which inherit it
    try:
        import uvloop

        return uvloop.run(_run(config))
    except AddressInUse as exc:  # one hmmd per endpoint: the live one keeps serving
        print(f"hmmd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OwnersError as exc:  # a directory another user made, or one that cannot be made:
        print(f"hmmd: {exc}", file=sys.stderr)  # a deployment error, which a restart repeats
        return EXIT_USAGE
    except ValueError as exc:  # the config layer let through what the transport refuses: a bug
        return refuse("hmmd", exc)
    except OSError as exc:  # the bind itself failed: a missing directory, no permission
        print(f"hmmd: cannot serve {config.endpoint}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _check_config(config: Config, args: argparse.Namespace) -> int:
    """``hmmd check-config``: the configuration loaded and passed every check, which are all
    that ``run`` makes before it binds (``config.load``)."""
    print("configuration OK")
    return EXIT_OK


def _version(config: Config, args: argparse.Namespace) -> int:
    """``hmmd version``: what ``hmmd --version`` prints."""
    print(_version_line())
    return EXIT_OK


def _version_line() -> str:
    """``hmmd 0.1.0, protocol 1.3``."""
    return version_line("hmmd", version())


#: The subcommands, by name; each gets the loaded, checked configuration.
COMMANDS: dict[str, Callable[[Config, argparse.Namespace], int]] = {
    "run": _serve,
    "check-config": _check_config,
    "version": _version,
}


def _flags(args: argparse.Namespace) -> dict[str, object]:
    """The settings the flags give (None where a flag is not given, or not ``run``'s)."""
    return {key: getattr(args, key, None) for key in _FLAGS}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hmmd`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = load(args.config, flags=_flags(args))
        if config.policy:
            Policy.load(config.policy)
    except (ConfigError, PolicyError) as exc:
        return refuse("hmmd", exc)
    logfmt.configure(config.log_level, config.log_format)
    if args.print_config:
        sys.stdout.write(config.as_toml())
        return EXIT_OK
    command = COMMANDS.get(args.command)
    if command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return command(config, args)


if __name__ == "__main__":
    sys.exit(main())
