"""The ``hm-agent`` command line: run an mlx5-model NIC as a process and serve RDMA.

The agent opens a session with hmmd, binds its RDMA listener, registers the
MRs it is told to, and serves READ, WRITE and atomics on them to the remote
requesters its grants name (``RdmaPeer``). A ``tcp://`` listener is a CURVE
server admitting the keys in ``listen_allow`` (or plain TCP with ``insecure``);
an ``ipc://`` one knows its requesters' uids. It prints one ``mr ...`` line per
MR, then ``hm-agent ready <endpoint>``, to stdout, and tells systemd
``READY=1``; logs go to stderr, as hmmd's do (``--log-format text`` with timestamps,
or ``json``: ``hmmirror.daemon.logfmt``). SIGHUP rereads the config file's grants.
SIGTERM or SIGINT deregisters every MR (waiting for operations in flight) and
exits 0.

Exit codes: 0 success, 1 runtime failure (hmmd unreachable, a registration
refused), 2 usage or configuration error (a listen endpoint that cannot be
bound included). Every error is one line on stderr, ``hm-agent: ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from hmmirror.client.errors import AgentError, DaemonUnavailable
from hmmirror.client.mlx5.grants import Grants
from hmmirror.tools import DISTRIBUTION
from hmmirror.tools.agentconfig import (
    DEFAULT_DAEMON,
    DEFAULT_LISTEN,
    AgentConfig,
    load,
    reload_grants,
    rights,
)
from hmmirror.transport.settings import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    Parser,
    VersionAction,
    distribution_version,
    refuse,
    version_line,
)

#: mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: The settings the flags may set (a flag not given is None and leaves the layer below).
_FLAGS = ("daemon", "listen", "name", "mr", "grant", "log_level", "log_format", "server_key",
          "client_key", "listen_key", "listen_allow", "insecure", "dma_window")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    """Build the ``hm-agent`` argument parser."""
    parser = Parser(
        prog="hm-agent",
        description="Run an mlx5-model RDMA NIC with On-Demand Paging over hmmd: register MRs on "
        "live processes and serve remote READ, WRITE and atomics on them by rkey.",
        epilog="Settings come from defaults < --config FILE < HMMIRROR_ENDPOINT, "
        "HMMIRROR_AGENT_LISTEN, HMMIRROR_AGENT_LISTEN_KEY, HMMIRROR_AGENT_LISTEN_ALLOW, "
        "HMMIRROR_AGENT_NAME, HMMIRROR_AGENT_DMA_WINDOW, HMMIRROR_SERVER_KEY, "
        "HMMIRROR_CLIENT_KEY (empty: unset) < flags; "
        "--mr replaces the file's mr list, --grant adds to its grants. Example: "
        "hm-agent --listen-key agent.key_secret --listen-allow allow/ "
        "--mr buf=1234:0x7f0000000000:2M:rwa --grant allow/host-b.key:buf:rw",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file (keys as the long flags)")
    parser.add_argument(
        "--daemon",
        metavar="ENDPOINT[,ENDPOINT...]",
        help=f"hmmd (default {DEFAULT_DAEMON}); every hmmd of a host that runs several",
    )
    parser.add_argument(
        "--listen", metavar="ENDPOINT", help=f"where to serve RDMA (default {DEFAULT_LISTEN}; "
        "port 0 picks a free one)",
    )  # fmt: skip
    parser.add_argument("--name", help="device name shown by hmmctl stat mr (default mlx5_0)")
    parser.add_argument(
        "--mr",
        action="append",
        metavar="SPEC",
        help="register [NAME=]PID:ADDR:LENGTH[:RIGHTS] or [NAME=]PID:all[:RIGHTS] (implicit "
        "ODP); RIGHTS are r (remote read, the default), w (remote write), a (remote atomic); "
        "NAME defaults to mr1, mr2, ... in order. Repeatable.",
    )
    parser.add_argument(
        "--grant",
        action="append",
        metavar="WHO:MRS:RIGHTS",
        help="let WHO (curve:KEY, a requester's .key certificate file, uid:N over ipc://, or "
        "any) use the MRs named MRS (comma-separated, * for all) with RIGHTS (r, w, a), as "
        "far as each MR's own rights allow. Repeatable. Without a grant a requester has no MR.",
    )
    parser.add_argument(
        "--listen-key", metavar="FILE", help="this agent's secret CURVE certificate (tcp:// listen)"
    )
    parser.add_argument(
        "--listen-allow",
        metavar="DIR",
        help="directory of the public .key certificates of requesters allowed to connect "
        "(tcp:// listen; reread when it changes)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="serve a tcp:// listen endpoint as plain TCP, with no authentication: requesters "
        "get only what grants to 'any' give, and no stat_mr",
    )
    parser.add_argument(
        "--server-key", metavar="FILE", help="hmmd's public CURVE certificate (tcp:// hmmd)"
    )
    parser.add_argument(
        "--client-key", metavar="FILE", help="this agent's secret CURVE certificate"
    )
    parser.add_argument(
        "--dma-window", metavar="SIZE",
        help="share a memfd of SIZE bytes with an ipc:// hmmd as the DMA window, so that READ "
        "and WRITE data never crosses hmmd's socket (protocol 1.1; default 32MiB, at most "
        "64MiB; 0 or off: none). Requests that find no free slot take the plain path",
    )  # fmt: skip
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format", choices=["text", "json"],
        help="stderr lines: text (timestamped) or one JSON object per line, as hmmd's (text)",
    )  # fmt: skip
    parser.add_argument("--version", action=VersionAction, line=_version)
    sub = parser.add_subparsers(dest="command", metavar="[COMMAND]")
    sub.add_parser("run", help="serve RDMA until SIGTERM or SIGINT (the default)")
    sub.add_parser("check-config", help="check the settings and exit 0 if they are good")
    sub.add_parser("version", help="print versions and exit")
    return parser


async def serve(conf: AgentConfig, args: argparse.Namespace | None = None) -> int:
    """Connect, bind, register, serve until a signal; return the exit code."""
    from hmmirror.client.group import connect_group
    from hmmirror.client.mlx5.nic import Nic
    from hmmirror.client.mlx5.service import RdmaService
    from hmmirror.client.session import Session
    from hmmirror.daemon.sdnotify import notify

    log = logging.getLogger("hmmirror.agent")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP must not kill an agent that is still starting: its grants are read at start.
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP while starting: ignored"))
    config = args.config if args is not None else None
    flag_grants = (args.grant or []) if args is not None else []
    curve = None
    if conf.server_key or conf.client_key:
        from hmmirror.client.curve import CurveKeys

        try:
            curve = CurveKeys.load(conf.server_key, conf.client_key)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"server_key/client_key: {exc}") from exc
    async with connect_group(conf.daemons, name=conf.name[:64], curve=curve) as group:

        async def attach(session: Session) -> None:
            """The DMA window for an ipc:// hmmd's session (one that answered late too)."""
            if conf.dma_window and session.endpoint.startswith("ipc://"):
                await session.use_window(conf.dma_window)

        for session in group.sessions:
            await attach(session)
        group.on_join = attach
        # One hmmd: the plain session. Several (some perhaps not answering yet): each MR
        # goes to the one watching its process.
        nic = Nic(group if len(conf.daemons) > 1 else group.sessions[0], conf.name)
        service = RdmaService(
            nic, conf.listen, key_file=conf.listen_key, allow_dir=conf.listen_allow,
            insecure=conf.insecure,
        )  # fmt: skip
        names: dict[str, int] = {}
        try:
            for spec in conf.mr:
                mr = await nic.reg_mr(spec.pid, spec.addr, spec.length, spec.access)
                names[spec.name] = mr.mrn
                where = "all" if mr.implicit else f"{mr.addr:#x} length={mr.length}"
                print(
                    f"mr name={spec.name} mrn={mr.mrn} rkey={mr.rkey:#x} pid={mr.pid} "
                    f"addr={where} rights={rights(mr.access)}",
                    flush=True,
                )
            service.grants = Grants(conf.grant, names)
            service.start()
        except BaseException:
            await service.close()
            await nic.close()
            raise

        def reload() -> None:
            """SIGHUP: the config file's grants as they are now (a bad file changes nothing),
            and the allow-list directory read again."""
            service.reload()
            try:
                service.grants = reload_grants(config, flag_grants, names)
            except ConfigError as exc:
                log.error("SIGHUP: grants unchanged: %s", exc)
                return
            log.info("SIGHUP: %d requester(s) hold grants now", len(service.grants))

        loop.add_signal_handler(signal.SIGHUP, reload)
        print(f"hm-agent ready {service.endpoint}", flush=True)
        notify(f"READY=1\nSTATUS=serving {len(nic.mrs)} MR(s) on {service.endpoint}")
        if conf.insecure:
            log.warning(
                "%s is plain TCP (insecure = true): anyone who reaches it gets what the grants "
                "to 'any' give, unauthenticated", service.endpoint,
            )  # fmt: skip
        if not len(service.grants):
            log.warning("no requester holds a grant: every RDMA access will be refused")
        log.info(
            "hm-agent %s serving %d MR(s) on %s (hmmd %s, epoch %s)",
            nic.name, len(nic.mrs), service.endpoint, conf.daemon,
            ", ".join(str(s.epoch) for s in group.sessions),
        )  # fmt: skip
        try:
            await stop.wait()
        finally:
            notify("STOPPING=1")
            log.info("stopping: deregistering %d MR(s)", len(nic.mrs))
            await service.close()
            await nic.close()
    return EXIT_OK


def keep_freed_memory() -> None:
    """Make glibc reuse freed megabyte buffers instead of unmapping them.

    Each 2 MiB DMA reply arrives in a buffer libzmq mallocs; above glibc's mmap
    threshold every one is a fresh mapping, paid for with 512 page faults and a
    munmap. Raising the threshold and the trim threshold keeps them in the heap.
    """
    with contextlib.suppress(Exception):  # not glibc: nothing to tune
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)


def settings(args: argparse.Namespace) -> AgentConfig:
    """The checked settings: defaults < ``--config`` file < environment < flags."""
    return load(args.config, {key: getattr(args, key) for key in _FLAGS})


def run(args: argparse.Namespace) -> int:
    """``hm-agent [run]``: serve until SIGTERM or SIGINT; return the exit code."""
    conf = settings(args)
    keep_freed_memory()
    from hmmirror.daemon import logfmt  # hmmd's formats: one look for both programs' logs

    logfmt.configure(conf.log_level, conf.log_format)
    from hmmirror.client.mlx5.service import ListenError
    from hmmirror.transport.server import raise_nofile

    raise_nofile()  # the listener's connection cap follows it (``transport.server.fd_room``)

    try:
        import uvloop

        return uvloop.run(serve(conf, args))
    except ConfigError as exc:
        return refuse("hm-agent", exc)
    except ListenError as exc:
        print(f"hm-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (AgentError, OSError) as exc:
        hint = ""
        keyless = "tcp://" in conf.daemon and not conf.server_key
        if isinstance(exc, DaemonUnavailable) and keyless:  # hmmd only logs why it ignored us
            hint = " (no server_key/client_key: a tcp:// hmmd that is not insecure needs them)"
        print(f"hm-agent: {exc}{hint}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # zmq errors binding the endpoint, and the like
        print(f"hm-agent: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def check_config(args: argparse.Namespace) -> int:
    """``hm-agent check-config``: exit 0 if the settings load and pass every check."""
    settings(args)
    print("configuration OK")
    return EXIT_OK


def show_version(args: argparse.Namespace) -> int:
    """``hm-agent version`` (which, unlike ``run``, needs no settings)."""
    print(_version())
    return EXIT_OK


def _version() -> str:
    """What ``hm-agent --version`` prints."""
    return version_line("hm-agent", distribution_version(DISTRIBUTION))


#: The subcommands; none given is ``run``. A ConfigError from any is a configuration error.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": run,
    "check-config": check_config,
    "version": show_version,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hm-agent`` console script."""
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command or "run"](args)
    except ConfigError as exc:
        return refuse("hm-agent", exc)


if __name__ == "__main__":
    sys.exit(main())
