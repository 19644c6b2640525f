"""``hmmctl stat mr`` and ``hmmctl keys generate``: an hm-agent's MR counters in the shape of
iproute2's ``rdma stat mr`` (text, ``-j`` and ``-d``), and CURVE key pairs.

``rdma -j stat mr`` prints a JSON array, one object per MR, starting with the device's
``ifindex`` and ``ifname``; ``rdma res show mr`` names an MR's keys and range ``rkey``,
``lkey``, ``iova`` (hex: ``0x1f`` in text, ``"1f"`` in JSON), ``mrlen``, ``pid`` and
``comm``. ``-d`` adds those, so a script written for one reads the other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from urllib.parse import urlsplit

from hmmirror.client.errors import AgentError
from hmmirror.tools.ctlinspect import emit, fail, load_keys
from hmmirror.transport.settings import EXIT_USAGE

#: ``rdma stat mr``'s counters, in the order it prints them.
MR_COUNTERS = (
    "page_faults",
    "page_faults_handled",
    "page_invalidations",
    "page_invalidations_handled",
    "page_prefetch",
)
#: An hm-agent serves one device: its index, as ``rdma dev`` numbers the first one.
IFINDEX = 0
#: An implicit (whole address space) MR's length: SIZE_MAX, as ``ibv_reg_mr`` is given.
IMPLICIT_MRLEN = (1 << 64) - 1


def _local(endpoint: str) -> bool:
    """Whether an agent at ``endpoint`` runs on this host (its pids are ours to name)."""
    if endpoint.startswith("ipc://"):
        return True
    host = urlsplit(endpoint).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def _comm(pid: int) -> str | None:
    """The command name of ``pid`` on this host (as rdma reads it), or None."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
        return f.read().strip()
    return None


def _details(row: dict[str, int], local: bool) -> dict[str, int | str]:
    """An MR's rdma fields: rkey, lkey (mlx5: the same mkey), iova, mrlen, pid, comm."""
    implicit = row["length"] == 0
    out: dict[str, int | str] = {
        "rkey": row["rkey"], "lkey": row["rkey"], "iova": 0 if implicit else row["addr"],
        "mrlen": IMPLICIT_MRLEN if implicit else row["length"], "pid": row["pid"],
    }  # fmt: skip
    comm = _comm(row["pid"]) if local else None
    if comm is not None:  # rdma leaves comm out when it has none
        out["comm"] = comm
    return out


def stat_mr(args: argparse.Namespace) -> int:
    """``hmmctl stat mr [show]``: one line per MR granted to us, as ``rdma stat mr``."""
    from hmmirror.client.mlx5.peer import RdmaPeer

    if (args.agent_key or args.client_key) and not (args.agent_key and args.client_key):
        return fail("stat mr needs both --agent-key and --client-key", EXIT_USAGE)
    curve = load_keys(args.agent_key, args.client_key, "--agent-key")

    async def fetch() -> tuple[str, list[dict[str, int]]]:
        """Ask the agent for its MR table."""
        async with RdmaPeer.connect(args.agent, timeout=args.timeout, curve=curve) as peer:
            return await peer.stat_mr()

    try:
        device, rows = asyncio.run(fetch())
    except AgentError as exc:
        return fail(str(exc))
    local = _local(args.agent)
    if args.json:
        out = []
        for row in rows:
            entry: dict[str, object] = {"ifindex": IFINDEX, "ifname": device, "mrn": row["mrn"]}
            if args.details:
                details = _details(row, local)
                for key in ("rkey", "lkey", "iova"):  # rdma's print_hex: "%x" in a string
                    details[key] = f"{details[key]:x}"
                entry.update(details)
            entry.update((name, row[name]) for name in MR_COUNTERS)
            out.append(entry)
        emit(out)
        return 0
    for row in rows:
        fields = [f"dev {device}", f"mrn {row['mrn']}"]
        if args.details:
            for key, value in _details(row, local).items():
                shown = f"{value:#x}" if key in ("rkey", "lkey", "iova") else value
                fields.append(f"{key} {shown}")
        fields += [f"{name} {row[name]}" for name in MR_COUNTERS]
        print(" ".join(fields))
    return 0


def keys(args: argparse.Namespace) -> int:
    """``hmmctl keys generate DIR NAME``."""
    from hmmirror.client.curve import generate

    try:
        public, secret = generate(args.directory, args.name, force=args.force)
    except ValueError as exc:  # a NAME that is not a plain file name
        return fail(f"keys generate: {exc}", EXIT_USAGE)
    except OSError as exc:  # the keys exist already, or the directory cannot be written
        return fail(f"keys generate: {exc}")
    if args.json:
        emit({"public": public, "secret": secret})
    else:
        print(f"public {public}\nsecret {secret}")
    return 0
