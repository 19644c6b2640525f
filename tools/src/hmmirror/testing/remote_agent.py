"""An agent process for multi-node tests, driven by one-line commands on stdin.

``python -m hmmirror.testing.remote_agent ENDPOINT PID ADDR NPAGES [--server-key F
--client-key F] [--name N]`` connects (CURVE when keys are given), mirrors
[ADDR, +NPAGES pages) of PID for READ and WRITE, and prints one JSON object per
line: first ``{"ready": ...}``, then one answer per command:

- ``read``: the first 16 bytes of each page, faulting as needed (or the error);
  a mirror that was evicted or lost to a daemon restart is registered afresh
  first, on the agent's own initiative;
- ``state``: the session's epoch, whether it was evicted or lost, the mirror's
  events and counters, and whether the table holds any entry;
- ``remirror``: register the range again (after an eviction or a daemon restart);
- ``exit``.

Every request has the session's deadline, so a cut link gives an error line,
not a hang.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from hmmirror.client import Access, AgentError, Mirror, Session, connect
from hmmirror.client.curve import CurveKeys

PAGE = 4096


def say(**fields: Any) -> None:
    """One JSON line on stdout."""
    print(json.dumps(fields), flush=True)


async def reopened(session: Session, timeout: float) -> None:
    """Wait (up to ``timeout``) until a lost session has been opened again."""
    deadline = asyncio.get_running_loop().time() + timeout
    while session.lost is not None and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)


async def main(args: argparse.Namespace) -> None:
    """Connect, mirror, then serve stdin commands until ``exit`` or EOF."""
    curve = CurveKeys.load(args.server_key, args.client_key) if args.server_key else None
    loop = asyncio.get_running_loop()
    async with connect(args.endpoint, name=args.name, timeout=args.timeout, curve=curve) as s:
        length = args.npages * PAGE

        async def mirror_it() -> Mirror:
            return await s.mirror(args.pid, args.addr, length, Access.READ | Access.WRITE)

        mirror = await mirror_it()
        say(ready=True, mirror=mirror.id, epoch=s.epoch)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            cmd = line.strip()
            if cmd in ("", "exit"):
                return
            try:
                if mirror.dropped is not None and cmd != "state":
                    await reopened(s, args.timeout)
                if mirror.dropped is not None and s.lost is None and cmd != "state":
                    # Evicted, or hmmd restarted: nothing survived; register again on our own.
                    mirror = await mirror_it()
                if cmd == "read":
                    result = await mirror.read(args.addr, args.npages)
                    data = result.data
                    pages = [data[i * PAGE : i * PAGE + 16].hex() for i in range(args.npages)]
                    say(pages=pages, faults=result.faults)
                elif cmd == "state":
                    say(
                        epoch=s.epoch, lost=s.lost, dropped=mirror.dropped,
                        held=int((mirror.table != 0).sum()),
                        events=[[a, b, int(e)] for a, b, e in mirror.events],
                        counters=dict(mirror.counters), mirror=mirror.id,
                    )  # fmt: skip
                elif cmd == "remirror":
                    mirror = await mirror_it()
                    say(mirror=mirror.id, epoch=s.epoch)
                else:
                    say(error=f"unknown command {cmd!r}")
            except (AgentError, OSError) as exc:
                say(error=f"{type(exc).__name__}: {exc}")


def cli() -> None:
    """Parse the arguments and run."""
    parser = argparse.ArgumentParser(prog="python -m hmmirror.testing.remote_agent")
    parser.add_argument("endpoint")
    parser.add_argument("pid", type=int)
    parser.add_argument("addr", type=lambda s: int(s, 0))
    parser.add_argument("npages", type=int)
    parser.add_argument("--server-key")
    parser.add_argument("--client-key")
    parser.add_argument("--name", default="remote")
    parser.add_argument("--timeout", type=float, default=5.0)
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
