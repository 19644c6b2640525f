"""The ``hm-agent`` command line: run an mlx5-model NIC as a process and serve RDMA.

The agent opens a session with hmmd, binds its RDMA listener, registers the
MRs it is told to, and serves READ, WRITE and atomics on them to the remote
requesters its grants name (``RdmaPeer``). A ``tcp://`` listener is a CURVE
server admitting the keys in ``listen_allow`` (or plain TCP with ``insecure``);
an ``ipc://`` one knows its requesters' uids. It prints one ``mr ...`` line per
MR, then ``hm-agent ready <endpoint>``, to stdout, and tells systemd
``READY=1``; logs go to stderr. SIGHUP rereads the config file's grants.
SIGTERM or SIGINT deregisters every MR (waiting for operations in flight) and
exits 0.

Exit codes: 0 success, 1 runtime failure (hmmd unreachable, a registration
refused), 2 usage or configuration error (a listen endpoint that cannot be
bound included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq.auth
from hmmirror.client.errors import AgentError
from hmmirror.client.mlx5.grants import MR_NAME, Grant, GrantError, Grants, grant_from_table
from hmmirror.client.mlx5.verbs import WHOLE_ADDRESS_SPACE, AccessFlags

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
DEFAULT_DAEMON = "ipc:///run/hmmirror/hmmd.sock"
#: The port perftest's RDMA tools have always used.
DEFAULT_LISTEN = "tcp://127.0.0.1:18515"
_SIZE = re.compile(r"^(0x[0-9a-fA-F]+|\d+)([KMG]?)$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_RIGHTS = {
    "r": AccessFlags.REMOTE_READ,
    "w": AccessFlags.REMOTE_WRITE | AccessFlags.LOCAL_WRITE,
    "a": AccessFlags.REMOTE_ATOMIC | AccessFlags.LOCAL_WRITE,
}


class UsageError(Exception):
    """A bad flag, environment variable or config file value."""


@dataclass(frozen=True)
class MrSpec:
    """One ``--mr`` registration: process, range (None: implicit) and access, and its name."""

    pid: int
    addr: int
    length: int
    access: AccessFlags
    name: str = ""

    @property
    def implicit(self) -> bool:
        """Whether this is a whole-address-space MR."""
        return self.length == WHOLE_ADDRESS_SPACE


def parse_size(text: str) -> int:
    """``4096``, ``0x1000``, ``64K``, ``2M`` or ``1G`` as bytes."""
    m = _SIZE.match(text.strip())
    if m is None:
        raise UsageError(f"{text!r} is not a size (like 4096, 0x1000, 64K, 2M, 1G)")
    return int(m.group(1), 0) * _UNITS[m.group(2)]


def parse_mr(text: str, default_name: str = "") -> MrSpec:
    """``[NAME=]PID:ADDR:LENGTH[:RIGHTS]`` or ``[NAME=]PID:all[:RIGHTS]``; RIGHTS r, w, a."""
    name, _, rest_text = text.rpartition("=")
    parts = rest_text.split(":")
    try:
        if name and not MR_NAME.match(name):
            raise ValueError(f"name {name!r} is not letters, digits, _ . - (at most 64)")
        pid = int(parts[0])
        if len(parts) >= 2 and parts[1] == "all":
            addr, length, rest = 0, WHOLE_ADDRESS_SPACE, parts[2:]
        elif len(parts) >= 3:
            addr, length, rest = int(parts[1], 0), parse_size(parts[2]), parts[3:]
        else:
            raise ValueError("too few fields")
        if len(rest) > 1:
            raise ValueError("too many fields")
        letters = rest[0] if rest else "r"
        if not letters or set(letters) - set(_RIGHTS):
            raise ValueError(f"rights {letters!r} are not a combination of r, w, a")
    except (ValueError, UsageError) as exc:
        raise UsageError(
            f"--mr {text!r}: {exc}; expected [NAME=]PID:ADDR:LENGTH[:RIGHTS] or "
            "[NAME=]PID:all[:RIGHTS]"
        ) from exc
    access = AccessFlags.ON_DEMAND
    for letter in letters:
        access |= _RIGHTS[letter]
    return MrSpec(pid, addr, length, access, name or default_name)


def rights(access: AccessFlags) -> str:
    """The RIGHTS letters of ``access``."""
    return "".join(
        letter
        for letter, flag in (
            ("r", AccessFlags.REMOTE_READ),
            ("w", AccessFlags.REMOTE_WRITE),
            ("a", AccessFlags.REMOTE_ATOMIC),
        )
        if access & flag
    )


def _parser() -> argparse.ArgumentParser:
    """Build the ``hm-agent`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="hm-agent",
        description="Run an mlx5-model RDMA NIC with On-Demand Paging over hmmd: register MRs on "
        "live processes and serve remote READ, WRITE and atomics on them by rkey.",
        epilog="Settings come from defaults < --config FILE < HMMIRROR_ENDPOINT, "
        "HMMIRROR_AGENT_LISTEN, HMMIRROR_AGENT_LISTEN_KEY, HMMIRROR_AGENT_LISTEN_ALLOW, "
        "HMMIRROR_AGENT_NAME < flags; --grant adds to the config file's grants. Example: "
        "hm-agent --listen-key agent.key_secret --listen-allow allow/ "
        "--mr buf=1234:0x7f0000000000:2M:rwa --grant allow/host-b.key:buf:rw",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file (keys as the long flags)")
    parser.add_argument("--daemon", metavar="ENDPOINT", help=f"hmmd (default {DEFAULT_DAEMON})")
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
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return parser


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < config file < environment < flags."""
    out: dict[str, Any] = {
        "daemon": DEFAULT_DAEMON,
        "listen": DEFAULT_LISTEN,
        "name": "mlx5_0",
        "mr": [],
        "log_level": "info",
        "server_key": "",
        "client_key": "",
        "listen_key": "",
        "listen_allow": "",
        "insecure": False,
        "grant": [],
    }
    if args.config:
        try:
            with open(args.config, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"cannot read {args.config}: {exc}") from exc
        unknown = set(data) - set(out)
        if unknown:
            raise UsageError(f"{args.config}: unknown keys {sorted(unknown)}")
        out.update(data)
    for key, env in (
        ("daemon", "HMMIRROR_ENDPOINT"),
        ("listen", "HMMIRROR_AGENT_LISTEN"),
        ("listen_key", "HMMIRROR_AGENT_LISTEN_KEY"),
        ("listen_allow", "HMMIRROR_AGENT_LISTEN_ALLOW"),
        ("name", "HMMIRROR_AGENT_NAME"),
        ("server_key", "HMMIRROR_SERVER_KEY"),
        ("client_key", "HMMIRROR_CLIENT_KEY"),
    ):
        if os.environ.get(env):
            out[key] = os.environ[env]
    for key in ("daemon", "listen", "name", "log_level", "server_key", "client_key",
                "listen_key", "listen_allow", "insecure"):  # fmt: skip
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    if args.mr:
        out["mr"] = list(args.mr)
    if not isinstance(out["mr"], list):
        raise UsageError("mr must be a list of SPEC strings")
    out["mr"] = [parse_mr(str(spec), f"mr{i}") for i, spec in enumerate(out["mr"], 1)]
    names = [spec.name for spec in out["mr"]]
    if len(set(names)) != len(names):
        raise UsageError(f"MR names must differ: {names}")
    for key in ("daemon", "listen", "name"):
        if not isinstance(out[key], str) or not out[key]:
            raise UsageError(f"{key} must be a non-empty string")
    if not isinstance(out["insecure"], bool):
        raise UsageError("insecure must be true or false")
    out["grant"] = read_grants(out["grant"], args.config or "config", out["mr"])
    out["grant"] += read_grants(args.grant or [], "--grant", out["mr"])
    check_listen(out)
    return out


def read_grants(entries: Any, where: str, mrs: Sequence[MrSpec]) -> list[Grant]:
    """``grant`` entries (``[[grant]]`` tables or ``--grant`` strings), checked against ``mrs``."""
    if not isinstance(entries, list):
        raise UsageError(f"{where}: grant must be a list of [[grant]] tables or strings")
    try:
        grants = [g for i, e in enumerate(entries) for g in grant_from_table(e, f"{where}: "
                  f"grant {i + 1}")]  # fmt: skip
        Grants(grants, {spec.name: i for i, spec in enumerate(mrs, 1)})  # names exist
    except GrantError as exc:
        raise UsageError(str(exc)) from exc
    return grants


def check_listen(conf: dict[str, Any]) -> None:
    """The listen endpoint's scheme and security settings make sense (before anything starts)."""
    listen = conf["listen"]
    for key in ("listen_key", "listen_allow"):
        if not isinstance(conf[key], str):
            raise UsageError(f"{key} must be a string")
    if listen.startswith("ipc://"):
        if conf["listen_key"] or conf["listen_allow"] or conf["insecure"]:
            raise UsageError(
                f"{listen} is ipc://: requesters are known by uid; listen_key, listen_allow "
                "and insecure are for tcp:// only"
            )
        return
    if not listen.startswith("tcp://"):
        raise UsageError(f"cannot listen on {listen!r}: only tcp:// and ipc:// are served")
    if conf["insecure"]:
        if conf["listen_key"] or conf["listen_allow"]:
            raise UsageError("insecure and listen_key/listen_allow exclude each other")
        return
    if not (conf["listen_key"] and conf["listen_allow"]):
        raise UsageError(
            f"{listen} is a tcp:// endpoint: set listen_key (this agent's .key_secret) and "
            "listen_allow (a directory of allowed requesters' .key files), or insecure = true "
            "for plain TCP"
        )
    try:
        mode = os.stat(conf["listen_key"]).st_mode
    except OSError as exc:
        raise UsageError(f"listen_key: cannot read {conf['listen_key']}: {exc.strerror}") from exc
    if mode & 0o077:
        raise UsageError(
            f"listen_key: {conf['listen_key']} is readable by others (mode {mode & 0o777:o}); "
            "chmod 600 it"
        )
    try:
        _, secret = zmq.auth.load_certificate(conf["listen_key"])
    except (OSError, ValueError) as exc:
        raise UsageError(f"listen_key: {exc}") from exc
    if secret is None:
        raise UsageError(f"listen_key: {conf['listen_key']} holds no secret key (.key_secret)")
    if not os.path.isdir(conf["listen_allow"]):
        raise UsageError(f"listen_allow: {conf['listen_allow']} is not a directory")


def reload_grants(config: str | None, flag_grants: Sequence[str], mrs: Sequence[MrSpec],
                  names: dict[str, int]) -> Grants:  # fmt: skip
    """The grants of the config file as it is now, plus the ``--grant`` flags (SIGHUP)."""
    entries: Any = []
    if config:
        try:
            with open(config, "rb") as f:
                entries = tomllib.load(f).get("grant", [])
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"cannot read {config}: {exc}") from exc
    grants = read_grants(entries, config or "config", mrs)
    grants += read_grants(list(flag_grants), "--grant", mrs)
    try:
        return Grants(grants, names)
    except GrantError as exc:
        raise UsageError(str(exc)) from exc


async def serve(conf: dict[str, Any], args: argparse.Namespace | None = None) -> int:
    """Connect, bind, register, serve until a signal; return the exit code."""
    from hmmirror.client.mlx5.nic import Nic
    from hmmirror.client.mlx5.service import RdmaService
    from hmmirror.client.session import connect
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
    if conf["server_key"] or conf["client_key"]:
        from hmmirror.client.curve import CurveKeys

        try:
            curve = CurveKeys.load(conf["server_key"], conf["client_key"])
        except (OSError, ValueError) as exc:
            raise UsageError(f"server_key/client_key: {exc}") from exc
    async with connect(conf["daemon"], name=conf["name"][:64], curve=curve) as session:
        nic = Nic(session, conf["name"])
        service = RdmaService(
            nic, conf["listen"], key_file=conf["listen_key"], allow_dir=conf["listen_allow"],
            insecure=conf["insecure"],
        )  # fmt: skip
        names: dict[str, int] = {}
        try:
            for spec in conf["mr"]:
                mr = await nic.reg_mr(spec.pid, spec.addr, spec.length, spec.access)
                names[spec.name] = mr.mrn
                where = "all" if mr.implicit else f"{mr.addr:#x} length={mr.length}"
                print(
                    f"mr name={spec.name} mrn={mr.mrn} rkey={mr.rkey:#x} pid={mr.pid} "
                    f"addr={where} rights={rights(mr.access)}",
                    flush=True,
                )
            service.grants = Grants(conf["grant"], names)
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
                service.grants = reload_grants(config, flag_grants, conf["mr"], names)
            except UsageError as exc:
                log.error("SIGHUP: grants unchanged: %s", exc)
                return
            log.info("SIGHUP: %d requester(s) hold grants now", len(service.grants))

        loop.add_signal_handler(signal.SIGHUP, reload)
        print(f"hm-agent ready {service.endpoint}", flush=True)
        notify(f"READY=1\nSTATUS=serving {len(nic.mrs)} MR(s) on {service.endpoint}")
        if conf["insecure"]:
            log.warning(
                "%s is plain TCP (insecure = true): anyone who reaches it gets what the grants "
                "to 'any' give, unauthenticated", service.endpoint,
            )  # fmt: skip
        if not len(service.grants):
            log.warning("no requester holds a grant: every RDMA access will be refused")
        log.info(
            "hm-agent %s serving %d MR(s) on %s (hmmd %s, epoch %s)",
            nic.name, len(nic.mrs), service.endpoint, conf["daemon"], session.epoch,
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hm-agent`` console script."""
    args = _parser().parse_args(argv)
    try:
        conf = settings(args)
    except UsageError as exc:
        print(f"hm-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    keep_freed_memory()
    logging.basicConfig(
        level=str(conf["log_level"]).upper(),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from hmmirror.client.mlx5.service import ListenError

    try:
        import uvloop

        return uvloop.run(serve(conf, args))
    except (ListenError, UsageError) as exc:
        print(f"hm-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (AgentError, OSError) as exc:
        print(f"hm-agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # zmq errors binding the endpoint, and the like
        print(f"hm-agent: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
