"""The ``hm-agent`` command line: run an mlx5-model NIC as a process and serve RDMA.

The agent opens a session with hmmd, registers the MRs it is told to, and
serves READ, WRITE and atomics on them to remote requesters (``RdmaPeer``).
It prints one ``mr ...`` line per MR, then ``hm-agent ready <endpoint>``, to
stdout; logs go to stderr. SIGTERM or SIGINT deregisters every MR (waiting
for operations in flight) and exits 0.

Exit codes: 0 success, 1 runtime failure (hmmd unreachable, a registration
refused), 2 usage or configuration error.
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

from hmmirror.client.errors import AgentError
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
    """One ``--mr`` registration: process, range (None: implicit) and access."""

    pid: int
    addr: int
    length: int
    access: AccessFlags

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


def parse_mr(text: str) -> MrSpec:
    """``PID:ADDR:LENGTH[:RIGHTS]`` or ``PID:all[:RIGHTS]``; RIGHTS letters r, w, a."""
    parts = text.split(":")
    try:
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
            f"--mr {text!r}: {exc}; expected PID:ADDR:LENGTH[:RIGHTS] or PID:all[:RIGHTS]"
        ) from exc
    access = AccessFlags.ON_DEMAND
    for letter in letters:
        access |= _RIGHTS[letter]
    return MrSpec(pid, addr, length, access)


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
        "HMMIRROR_AGENT_LISTEN, HMMIRROR_AGENT_NAME < flags. Example: "
        "hm-agent --mr 1234:0x7f0000000000:2M:rwa --mr 1234:all:r",
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
        help="register PID:ADDR:LENGTH[:RIGHTS] or PID:all[:RIGHTS] (implicit ODP); RIGHTS are "
        "r (remote read, the default), w (remote write), a (remote atomic). Repeatable.",
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
        ("name", "HMMIRROR_AGENT_NAME"),
        ("server_key", "HMMIRROR_SERVER_KEY"),
        ("client_key", "HMMIRROR_CLIENT_KEY"),
    ):
        if os.environ.get(env):
            out[key] = os.environ[env]
    for key in ("daemon", "listen", "name", "log_level", "server_key", "client_key"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    if args.mr:
        out["mr"] = list(args.mr)
    if not isinstance(out["mr"], list):
        raise UsageError("mr must be a list of SPEC strings")
    out["mr"] = [parse_mr(str(spec)) for spec in out["mr"]]
    for key in ("daemon", "listen", "name"):
        if not isinstance(out[key], str) or not out[key]:
            raise UsageError(f"{key} must be a non-empty string")
    return out


async def serve(conf: dict[str, Any]) -> int:
    """Connect, register, serve until a signal; return the exit code."""
    from hmmirror.client.mlx5.nic import Nic
    from hmmirror.client.mlx5.service import RdmaService
    from hmmirror.client.session import connect

    log = logging.getLogger("hmmirror.agent")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    curve = None
    if conf["server_key"] or conf["client_key"]:
        from hmmirror.client.curve import CurveKeys

        curve = CurveKeys.load(conf["server_key"], conf["client_key"])
    async with connect(conf["daemon"], name=conf["name"][:64], curve=curve) as session:
        nic = Nic(session, conf["name"])
        try:
            for spec in conf["mr"]:
                mr = await nic.reg_mr(spec.pid, spec.addr, spec.length, spec.access)
                where = "all" if mr.implicit else f"{mr.addr:#x} length={mr.length}"
                print(
                    f"mr mrn={mr.mrn} rkey={mr.rkey:#x} pid={mr.pid} addr={where} "
                    f"rights={rights(mr.access)}",
                    flush=True,
                )
            service = RdmaService(nic, conf["listen"])
        except BaseException:
            await nic.close()
            raise
        print(f"hm-agent ready {service.endpoint}", flush=True)
        log.info(
            "hm-agent %s serving %d MR(s) on %s (hmmd %s, epoch %s)",
            nic.name, len(nic.mrs), service.endpoint, conf["daemon"], session.epoch,
        )  # fmt: skip
        try:
            await stop.wait()
        finally:
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
    try:
        import uvloop

        return uvloop.run(serve(conf))
    except (AgentError, OSError) as exc:
        print(f"hm-agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # zmq errors binding the endpoint, and the like
        print(f"hm-agent: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
